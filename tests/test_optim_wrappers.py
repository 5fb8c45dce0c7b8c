"""The standalone torch optimizers (MethodOptimizer subclasses): each equals its Method applied directly to
the 2-D weight (uid 1) and Adam to the bias (uid 2), bitwise, step by step."""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from conftest import closed_loop_grad
from torch import nn

from qtrain.optim import RACS, Alice, Alice0, AliceMethod, GaLore, GaLoreMethod, RacsMethod, apply_update_
from qtrain.optim.adam import Adam
from qtrain.optim.base import Method

CPU = torch.device("cpu")


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Case:
    cls: type  # the MethodOptimizer subclass
    kwargs: dict  # its constructor's arguments besides params and lr
    method: Callable[[], Method]  # the Method it must apply to the weight
    shape: tuple[int, int]  # nn.Linear's weight (out, in)
    lr: float
    grads: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (w, b, t) -> (gw, gb)


CASES = {
    "galore": Case(GaLore, dict(rank=3, update_proj_gap=2), lambda: GaLoreMethod(rank=3, update_proj_gap=2), (6, 10),
                   0.05, lambda w, b, t: (closed_loop_grad(w, t, 1000), closed_loop_grad(b, t, 1000))),
    "racs": Case(RACS, dict(alpha=0.03), lambda: RacsMethod(alpha=0.03), (6, 10), 0.02,
                 lambda w, b, t: (rand((6, 10), 40 + t), rand((6,), 50 + t))),
    "alice": Case(Alice, dict(rank=3, leading=1, update_interval=2),
                  lambda: AliceMethod(rank=3, leading=1, update_interval=2, beta3=0.999), (8, 12), 0.02,
                  lambda w, b, t: (rand((8, 12), 80 + t), rand((8,), 90 + t))),
    "alice0": Case(Alice0, dict(rank=3, leading=1, update_interval=2),
                   lambda: AliceMethod(rank=3, leading=1, update_interval=2, beta3=0.0), (8, 12), 0.02,
                   lambda w, b, t: (rand((8, 12), 80 + t), rand((8,), 90 + t))),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_optimizer_class_equals_method_and_adam_for_the_rest(case):
    torch.manual_seed(4)
    layer = nn.Linear(case.shape[1], case.shape[0])
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = case.cls(layer.parameters(), lr=case.lr, **case.kwargs)
    method, adam = case.method(), Adam()
    sw, sb = method.init_state(case.shape, CPU, 1), adam.init_state(case.shape[:1], CPU, 2)
    for t in range(1, 5):
        gw, gb = case.grads(layer.weight.detach(), layer.bias.detach(), t)
        layer.weight.grad, layer.bias.grad = gw.clone(), gb.clone()
        opt.step()
        apply_update_(w0, method.direction(gw, sw), gw, case.lr, 0.0)
        apply_update_(b0, adam.direction(gb, sb), gb, case.lr, 0.0)
        assert torch.equal(layer.weight.detach(), w0) and torch.equal(layer.bias.detach(), b0), \
            f"{case.cls.__name__} step {t}"
