"""Adam for the float tensors (embedding, lm_head, norms, biases): bitsandbytes 8-bit or torch AdamW.

`float_optimizer_factory(name, ...)` returns a `FloatAdam`, which the Updater uses two ways:
  - matrices (embedding, lm_head): `FloatAdam(p)` builds one optimizer per tensor, so a release hook
    steps exactly that tensor (torchtune's optimizer-in-backward pattern): torch AdamW (foreach=False), or
    bitsandbytes' 8-bit Adam (`Adam8bitNoSync`: its functional update, without the device sync
    bitsandbytes' own `step` makes after every parameter);
  - vectors (norm weights, biases): `FloatAdam.fused(params)` builds one `FusedAdamW` (qtrain.optim.fused_adam)
    for all of them: fp32 moments, one update of the whole group per step, whichever name the recipe gives
    ("adam8bit" would store 4096-element norms in 8 bits: 1.5 MiB saved at 7B for 65 device syncs).
Both run on CPU and CUDA (bitsandbytes >= 0.45 has CPU kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtrain.core.step_state import StepState
from qtrain.optim import adam8bit
from qtrain.optim.adam8bit import Adam8bit
from qtrain.optim.fused_adam import FusedAdamW, FusedAdamWSlot

FLOAT_OPTIMIZERS = ("adam8bit", "adamw")


@dataclass(frozen=True)
class FloatAdam:
    """The recipe's float optimizer: name ("adam8bit" | "adamw") and Adam hyperparameters. The LR is set per
    step by the caller (lr=0 here), or read from the Updater's StepState (`capturable`)."""

    name: str
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    capturable: bool = False  # "adam8bit": qtrain's kernel reading the step on the device, not bitsandbytes'

    def __call__(self, p: nn.Parameter, clock: StepState | None = None, kernels: str = "auto") -> torch.optim.Optimizer:
        """An optimizer over [p] alone; clock and kernels: the Updater's, for the capturable 8-bit Adam."""
        if self.name == "adam8bit" and self.capturable:
            if clock is None:
                raise ValueError("the capturable 8-bit Adam reads the step from a StepState: pass the Updater's clock")
            return Adam8bit(p, clock, self.betas, self.eps, self.weight_decay, kernels)
        if self.name == "adam8bit":
            return adam8bit_no_sync_class()([p], lr=0.0, betas=self.betas, eps=self.eps,
                                            weight_decay=self.weight_decay)
        return torch.optim.AdamW([p], lr=0.0, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                                 foreach=False)

    def fused(self, params: dict[str, nn.Parameter]) -> FusedAdamW:
        """One AdamW update for all of params (one dtype and device), applied at once."""
        return FusedAdamW(params, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


def float_optimizer_factory(name: str, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                            weight_decay: float = 0.0, capturable: bool = False) -> FloatAdam:
    if name not in FLOAT_OPTIMIZERS:
        raise ValueError(f"[optim] float_optimizer = {name!r} is unknown; choose one of {FLOAT_OPTIMIZERS}")
    return FloatAdam(name, tuple(betas), eps, weight_decay, capturable)


def step_bytes(opt, p: nn.Parameter, device_type: str) -> int:
    """Transient bytes of one `step` of an optimizer FloatAdam built, for its tensor p (the estimator asks).

    A FusedAdamW slot only copies the gradient into the group's persistent buffer; the fused update runs in
    finish_step, after backward, where its flat transients (a few x 4 B per vector element) are never the peak.
    torch AdamW (_single_tensor_adamw): `denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`, two
    temporaries in p's dtype. bitsandbytes Adam8bit: the CUDA kernels update p and the states in place; the CPU
    fallbacks (backends/cpu/ops.py) copy g (and a non-fp32 p) to fp32 and build the denominator from two
    temporaries, the 8-bit one also dequantizes both states to fp32 (tensors >= min_8bit_size).
    """
    numel, dtype = p.numel(), p.dtype
    if isinstance(opt, FusedAdamWSlot):
        return 0
    if isinstance(opt, Adam8bit):  # qtrain's capturable 8-bit Adam: one in-place kernel; the reference works in chunks
        on_kernel = device_type == "cuda" and opt.kernels != "torch"
        return 0 if on_kernel else 8 * torch.float32.itemsize * min(numel, adam8bit.BLOCK * adam8bit.CHUNK_BLOCKS)
    if isinstance(opt, torch.optim.AdamW):
        return 2 * numel * dtype.itemsize
    if device_type == "cuda":
        return 0
    states = 2 if numel >= opt.args.min_8bit_size else 0
    return (3 + states + (dtype != torch.float32)) * torch.float32.itemsize * numel


_ADAM8BIT = None


def adam8bit_no_sync_class() -> type:
    """bitsandbytes.optim.Adam8bit whose step makes no device sync (the class is built at first use:
    importing bitsandbytes probes CUDA, slowly and noisily)."""
    global _ADAM8BIT
    if _ADAM8BIT is None:
        import bitsandbytes as bnb

        class Adam8bitNoSync(bnb.optim.Adam8bit):
            """bitsandbytes' 8-bit Adam (same state, same state_dict, same kernels), stepped without the
            `torch.cuda.synchronize()` that `Optimizer8bit.step` calls after every parameter (bitsandbytes
            0.45-0.50, optim/optimizer.py `sync_gpu`). That sync exists for paged optimizers, whose state may
            live in unified memory; this one is never paged. Each parameter is one call of bitsandbytes'
            functional update (`optimizer_update_8bit_blockwise`, or `optimizer_update_32bit` below
            min_8bit_size elements): one kernel, on the default stream, step count kept on the host.
            Not capturable in a CUDA graph (bitsandbytes launches on the legacy default stream)."""

            def __init__(self, params, **kwargs):
                super().__init__(params, is_paged=False, **kwargs)

            @torch.no_grad()
            def step(self, closure=None):
                if closure is not None:
                    raise ValueError("Adam8bitNoSync.step takes no closure")
                if not self.initialized:
                    self.check_overrides()
                    self.to_gpu()
                    self.initialized = True
                for gindex, group in enumerate(self.param_groups):
                    for pindex, p in enumerate(group["params"]):
                        if p.grad is None:
                            continue
                        if len(self.state[p]) == 0:
                            self.init_state(group, p, gindex, pindex)
                        self.update_step(group, p, gindex, pindex)  # the functional update, no sync_gpu

        _ADAM8BIT = Adam8bitNoSync
    return _ADAM8BIT
