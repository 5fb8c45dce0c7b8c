"""One AdamW step for many small float tensors (RMSNorm weights, biases) at once: flat state, ~12 launches.

A 7B Llama has 65 norm weights of 4096 elements. Stepping each with its own optimizer costs a handful of
kernel launches per tensor, and bitsandbytes' 8-bit optimizer also synchronizes the device after every
one. `FusedAdamW` keeps the moments of the whole group in two flat fp32 buffers and applies one update to
all of them in `step`, a fixed number of launches whatever the number of tensors (2 MiB of state at 7B).

Release mode: the gradients arrive one at a time in release hooks. Each is copied into its slice of a flat
fp32 gradient buffer (`FusedAdamWSlot.step`, one copy launch, and the tensor's .grad is freed as before),
and the Updater applies the group's update once, in finish_step, after backward. Deferring is safe and
cheap: nothing reads a norm weight after its gradient is final (its block's forward and recompute are
done), the staged gradients are 4 bytes per element (1 MiB at 7B), and the update is the same code at the
same point in both modes, so release and ordinary stepping stay bit-identical.

Arithmetic (fp32 tensors): torch.optim.AdamW's single-tensor step, operation for operation, on the flat
buffers, so every element gets the bits torch.optim.AdamW(foreach=False) gives it (tests/test_fused_adam.py).
bf16 tensors: the same fp32 arithmetic on an fp32 copy, then stochastic rounding to bf16 with the generator
the caller passes (seeded per step: nothing to checkpoint); moments stay fp32. One group holds one dtype.

Per tensor, `FusedAdamWSlot` looks like a torch optimizer of that tensor: `state` (views into the flat
buffers, so tensor-summing tools count the group exactly once), `param_groups`, `step()` (stages p.grad),
and `state_dict()` / `load_state_dict()` in torch AdamW's format. A checkpoint written by per-tensor
torch AdamW loads unchanged; one written by bitsandbytes' 8-bit Adam is dequantized into the fp32 moments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from qtrain.quant.stochastic_round import stochastic_round_to_bf16


class FusedAdamW:
    """AdamW over `params` (name -> parameter, one dtype and device), applied to all of them at once."""

    def __init__(self, params: dict[str, nn.Parameter], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if not params:
            raise ValueError("FusedAdamW needs at least one tensor")
        tensors = list(params.values())
        dtypes, devices = {p.dtype for p in tensors}, {p.device for p in tensors}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"FusedAdamW takes one dtype on one device, got {sorted(map(str, dtypes))} on "
                             f"{sorted(map(str, devices))}: build one group per dtype")
        self.names, self.params = list(params), tensors
        self.dtype, self.device = tensors[0].dtype, tensors[0].device
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.sizes = [p.numel() for p in tensors]
        n = sum(self.sizes)
        self.exp_avg = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.exp_avg_sq = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.grad = torch.zeros(n, dtype=torch.float32, device=self.device)  # staged gradients of this step
        self.steps = 0  # updates applied (a Python int: bias corrections need no device read)
        self.step_t = torch.tensor(0.0)  # the same count as torch AdamW's CPU `step` tensor, for its state format
        self.received: set[str] = set()
        self.slots: dict[str, FusedAdamWSlot] = {}
        offset = 0
        for name, p, size in zip(self.names, tensors, self.sizes):
            self.slots[name] = FusedAdamWSlot(self, name, p, slice(offset, offset + size))
            offset += size

    def receive(self, name: str, grad: Tensor) -> None:
        """Stage one tensor's final gradient (copied: the caller may free it)."""
        slot = self.slots[name]
        self.grad[slot.index].copy_(grad.reshape(-1))
        self.received.add(name)

    @property
    def complete(self) -> bool:
        return len(self.received) == len(self.names)

    @torch.no_grad()
    def step(self, lr: float | Tensor, generator: torch.Generator | None = None, *, t: Tensor | None = None,
             to_bf16: Callable[[Tensor], Tensor] | None = None) -> None:
        """One AdamW update of every tensor from the staged gradients; all of them must have arrived.

        generator: the stochastic-rounding generator of this step for bf16 tensors (None: round to nearest).
        Capturable form (the Updater's, qtrain.core.step_state): lr an fp32 0-d device tensor, t the update number
        as an int64 0-d device tensor (bias corrections formed on the device from it, not from the host count),
        to_bf16 the rounding of the fp32 result to bf16 (stochastic, with a device seed). On the CPU both forms
        give the same bits.
        """
        if not self.complete:
            missing = sorted(set(self.names) - self.received)
            raise RuntimeError(f"fused AdamW step without the gradients of {missing[:5]} ({len(missing)} tensors)")
        self.received.clear()
        self.steps += 1
        beta1, beta2 = self.betas
        g = self.grad
        w = torch.cat([p.detach().reshape(-1) for p in self.params])  # a flat copy of the weights
        if w.dtype != torch.float32:
            w = w.float()
        # torch.optim.adam._single_tensor_adam (decoupled weight decay, not capturable), on the flat buffers
        if self.weight_decay != 0:
            w.mul_(1 - lr * self.weight_decay)
        self.exp_avg.lerp_(g, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if t is None:
            bias_correction1 = 1 - beta1**self.steps
            bias_correction2 = 1 - beta2**self.steps
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            w.addcdiv_(self.exp_avg, denom, value=-step_size)
        else:  # the same fp64 scalars as 0-d device tensors; CPU addcdiv_ is w + (value * m) / denom
            td = t.double()
            step_size = lr / (1 - beta1**td)  # lr: fp64, as the host's
            bias_correction2_sqrt = (1 - beta2**td).sqrt()
            denom = (self.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            w.add_(self.exp_avg.mul(-step_size).div_(denom))
        if self.dtype == torch.bfloat16 and to_bf16 is not None:
            w = to_bf16(w)
        elif self.dtype == torch.bfloat16 and generator is not None:
            w = stochastic_round_to_bf16(w, generator)
        elif self.dtype != torch.float32:
            w = w.to(self.dtype)
        torch._foreach_copy_([p.detach() for p in self.params],
                             [part.view_as(p) for part, p in zip(w.split(self.sizes), self.params)])

    def load_step(self, steps: int) -> None:
        self.steps = steps
        self.step_t.fill_(steps)


class FusedAdamWSlot:
    """One tensor of a FusedAdamW, with the interface of a torch optimizer over that tensor alone."""

    STATE_LABEL = "AdamW (fused: norms, biases)"  # how `qtrain estimate` names the group's persistent buffers

    def __init__(self, group: FusedAdamW, name: str, param: nn.Parameter, index: slice):
        self.group, self.name, self.param, self.index = group, name, param, index
        self.exp_avg = group.exp_avg[index].view_as(param)
        self.exp_avg_sq = group.exp_avg_sq[index].view_as(param)
        self.staged_grad = group.grad[index].view_as(param)
        self.param_groups = [{"params": [param], "lr": 0.0, "betas": group.betas, "eps": group.eps,
                              "weight_decay": group.weight_decay}]

    @property
    def state(self) -> dict[nn.Parameter, dict[str, Any]]:
        """Views into the group's flat buffers (each element counted once by tools that sum tensors)."""
        self.group.step_t.fill_(self.group.steps)  # a CPU tensor, brought up to date here: no op in the step
        return {self.param: {"step": self.group.step_t, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq,
                             "staged_grad": self.staged_grad}}

    def step(self) -> None:
        """Stage param.grad for the group's fused step (the Updater runs that in finish_step)."""
        self.group.receive(self.name, self.param.grad)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's format for one parameter (empty state before the first step)."""
        g = self.group
        state = {} if g.steps == 0 else {0: {"step": torch.tensor(float(g.steps)), "exp_avg": self.exp_avg,
                                             "exp_avg_sq": self.exp_avg_sq}}
        hyper = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [{**hyper, "params": [0]}]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """torch AdamW's state of this tensor, or bitsandbytes Adam8bit's (dequantized). Every tensor of a group
        carries the group's step count, so the last one loaded sets it."""
        st = next(iter(sd["state"].values()), None)
        if st is not None and "__bnb_optimizer_quant_state__" in st:  # bitsandbytes >= 0.48 nests its tensors
            st = {k: v for k, v in st.items() if k != "__bnb_optimizer_quant_state__"} | st["__bnb_optimizer_quant_state__"]
        if st is None:
            m = v = torch.zeros_like(self.exp_avg)
            steps = 0
        elif "state1" in st:  # bitsandbytes Adam8bit / 32-bit: state1 = exp_avg, state2 = exp_avg_sq
            m, v = (_bnb_state(st, i) for i in (1, 2))
            steps = int(st["step"])
        else:
            m, v, steps = st["exp_avg"], st["exp_avg_sq"], int(float(st["step"]))
        self.exp_avg.copy_(m.reshape(self.exp_avg.shape))
        self.exp_avg_sq.copy_(v.reshape(self.exp_avg_sq.shape))
        self.group.load_step(steps)


def _bnb_state(st: dict[str, Any], i: int) -> Tensor:
    """bitsandbytes' state{i} as fp32: 8-bit blockwise (blocks of 256, dynamic code map) or already fp32."""
    s = st[f"state{i}"]
    if s.dtype != torch.uint8:
        return s.float()
    import bitsandbytes.functional as F

    return F.dequantize_blockwise(s.cpu(), absmax=st[f"absmax{i}"].cpu(), code=st[f"qmap{i}"].cpu(), blocksize=256)
