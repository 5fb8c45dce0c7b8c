"""One recipe -> model and updater, the same way for the trainer, the estimator, and eval / generate / export.

`build(cfg, device)` is the only place that turns a TrainConfig into objects: the estimator builds on the meta
device with exactly the trainer's code, and commands that only read weights build the model alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtrain.config.recipe import TrainConfig
from qtrain.model.builder import build_model, enable_activation_checkpointing
from qtrain.update.build import build_updater
from qtrain.update.updater import Updater


@dataclass
class Built:
    model: nn.Module
    updater: Updater | None


def build(cfg: TrainConfig, device: torch.device | str, *, updater: bool = True, weights: bool = True) -> Built:
    """The recipe's model on device (meta: shapes only), with activation checkpointing as the recipe says,
    and its Updater unless updater=False (commands that only read weights need no optimizer state).
    weights=False skips initialising the weights (random or [model] init): a checkpoint overwrites them."""
    model = build_model(cfg.model, cfg.quant, device, seed=cfg.train.seed, weights=weights)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    return Built(model, build_updater(model, cfg) if updater else None)
