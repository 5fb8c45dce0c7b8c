"""One recipe -> model and updater, the same way for the trainer, the estimator, and eval / generate / export.

`build(cfg, device)` is the only place that turns a TrainConfig into objects: the estimator builds on the meta
device with exactly the trainer's code, and commands that only read weights build the model alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtrain.config import TrainConfig
from qtrain.model import build_model, enable_activation_checkpointing
from qtrain.optim.adam import Adam
from qtrain.optim.float_adam import float_optimizer_factory
from qtrain.optim.registry import build_method
from qtrain.updater import Updater


def build_updater(model: nn.Module, cfg: TrainConfig) -> Updater:
    """The optimizer side of a recipe: the matrix method, the float optimizers, rounding and kernels."""
    o = cfg.optim
    method = build_method(o.method, o.args, weight_decay=o.weight_decay, seed=cfg.train.seed)
    if hasattr(method, "kernels"):  # APOLLO's statistics kernels follow [quant] kernels like the int8 ones
        method.kernels = cfg.quant.kernels
    if hasattr(method, "keep_projections"):  # a captured step reads P from kept buffers (qtrain.step_graph)
        method.keep_projections = cfg.train.cuda_graph
    lm_head = method if o.lm_head_optimizer == "same_as_matrices" else None
    embedding = method if o.embedding_optimizer == "same_as_matrices" else None
    floats = float_optimizer_factory(o.float_optimizer, tuple(o.float_betas), o.float_eps)
    # Norm weights and biases (vectors), any dtype: one FusedAdamW (fp32 moments, SR to bf16) stepped once in
    # finish_step. bf16 matrices (embedding, lm_head): "adamw" becomes qtrain's fp32-state Adam with SR on
    # apply; "adam8bit" stays bitsandbytes (8-bit state, nearest rounding to bf16: Adam's normalised steps,
    # ~lr, are far above the bf16 ulp of |w| ~ 0.02, ~1e-4, so rounding loses little), without its syncs.
    bf16_adam = Adam(betas=tuple(o.float_betas), eps=o.float_eps) if o.float_optimizer == "adamw" else None
    return Updater(model, method, floats, lm_head_method=lm_head, embedding_method=embedding,
                   low_precision_adam=bf16_adam, seed=cfg.train.seed, rounding=cfg.quant.rounding,
                   float_grad_clip=o.float_grad_clip, kernels=cfg.quant.kernels)


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
