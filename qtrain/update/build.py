"""A recipe's optimizer side: the matrix method, the float optimizers, rounding and kernels, as one Updater."""

from __future__ import annotations

from torch import nn

from qtrain.config.recipe import TrainConfig
from qtrain.optim.adam import Adam
from qtrain.optim.float_adam import float_optimizer_factory
from qtrain.optim.registry import build_method
from qtrain.update.updater import Updater


def build_updater(model: nn.Module, cfg: TrainConfig) -> Updater:
    """The optimizer side of a recipe: the matrix method, the float optimizers, rounding and kernels."""
    o = cfg.optim
    method = build_method(o.method, o.args, weight_decay=o.weight_decay, seed=cfg.train.seed)
    # its own kernels follow [quant] kernels like the int8 ones; a captured step (qtrain.update.step_graph) reads
    # APOLLO's P from kept buffers
    method.configure(kernels=cfg.quant.kernels, keep_projections=cfg.train.cuda_graph)
    lm_head = method if o.lm_head_optimizer == "same_as_matrices" else None
    embedding = method if o.embedding_optimizer == "same_as_matrices" else None
    # a captured step: "adam8bit" matrices take qtrain's 8-bit Adam, which reads the LR and step on the device
    floats = float_optimizer_factory(o.float_optimizer, tuple(o.float_betas), o.float_eps,
                                     capturable=cfg.train.cuda_graph)
    # Norm weights and biases (vectors), any dtype: one FusedAdamW (fp32 moments, SR to bf16) stepped once in
    # finish_step. bf16 matrices (embedding, lm_head): "adamw" becomes qtrain's fp32-state Adam with SR on
    # apply; "adam8bit" stays bitsandbytes (8-bit state, nearest rounding to bf16: Adam's normalised steps,
    # ~lr, are far above the bf16 ulp of |w| ~ 0.02, ~1e-4, so rounding loses little), without its syncs.
    bf16_adam = Adam(betas=tuple(o.float_betas), eps=o.float_eps) if o.float_optimizer == "adamw" else None
    return Updater(model, method, floats, lm_head_method=lm_head, embedding_method=embedding,
                   low_precision_adam=bf16_adam, seed=cfg.train.seed, rounding=cfg.quant.rounding,
                   float_grad_clip=o.float_grad_clip, kernels=cfg.quant.kernels)
