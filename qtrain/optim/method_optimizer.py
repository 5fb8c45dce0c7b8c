"""MethodOptimizer: any qtrain method as a regular torch.optim.Optimizer (Adam for the other tensors)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from qtrain.optim.adam import Adam
from qtrain.optim.base import Method, apply_update_


class MethodOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer that applies a method (`method_cls`, built from the group's keys) to each 2-D
    parameter of a group whose `marker` key is set (rank not None, racs true, ...), and Adam to the rest.

    That is the usual APOLLO/GaLore pattern of one regular group plus one low-rank group. A subclass names
    its method and marker and spells out its hyperparameters and defaults in __init__; nothing else.
    The fallback Adam reads the group's adam_betas (else betas) and adam_eps (else 1e-6).
    """

    method_cls: type[Method]
    marker = "rank"

    def __init__(self, params, defaults: dict[str, Any]):
        super().__init__(params, defaults)
        uid = 0
        for group in self.param_groups:
            for p in group["params"]:
                uid += 1  # 1-based position across groups: the official projection seed (docs/algorithms.md §3)
                self.state[p]["uid"] = uid

    def method_for(self, group: dict[str, Any]) -> Method:
        fields = {f.name for f in dataclasses.fields(self.method_cls)}
        return self.method_cls(**{k: v for k, v in group.items() if k in fields})

    def uses_method(self, group: dict[str, Any], p: Tensor) -> bool:
        return group[self.marker] not in (None, False) and p.dim() == 2

    def fallback_for(self, group: dict[str, Any]) -> Method:
        return Adam(betas=group.get("adam_betas", group.get("betas")), eps=group.get("adam_eps", 1e-6),
                    weight_decay=group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                method = self.method_for(group) if self.uses_method(group, p) else self.fallback_for(group)
                state = self.state[p]
                if "step" not in state:
                    method.validate(tuple(p.shape))
                    state.update(method.init_state(tuple(p.shape), p.device, state["uid"]))
                update = method.direction(p.grad.float(), state)
                apply_update_(p, update, p.grad, group["lr"], method.weight_decay)
        return loss
