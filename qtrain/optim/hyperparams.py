"""Range checks for method hyperparameters: every error names the method, the key and the allowed range."""

from __future__ import annotations

from typing import Any, Sequence

from qtrain.errors import HyperparameterError


def check_range(
    method: str, name: str, value: float, lo: float, hi: float = float("inf"), *, lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise HyperparameterError unless lo <= value <= hi (`lo_open`/`hi_open` make a bound strict)."""
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise HyperparameterError(f"{method} {name} = {value!r} must be in {left}{lo}, {hi}{right}")


def check_choice(method: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise HyperparameterError(f"{method} {name} = {value!r}; allowed: {tuple(choices)}")


def check_betas(method: str, name: str, betas: Sequence[float], count: int) -> None:
    """`count` decay rates, each in [0, 1)."""
    if len(betas) != count:
        raise HyperparameterError(f"{method} {name} = {tuple(betas)!r} must hold {count} values, each in [0, 1)")
    for i, beta in enumerate(betas):
        check_range(method, f"{name}[{i}]", beta, 0.0, 1.0, hi_open=True)


def check_matrix_rank(method: str, rank: int, shape: tuple[int, ...]) -> None:
    """2-D weight and 1 <= rank <= a = min(m, n) (the projected side, docs/algorithms.md §0)."""
    if len(shape) != 2:
        raise HyperparameterError(f"{method} needs 2-D weights, got shape {shape}; train other tensors with Adam")
    if not 1 <= rank <= min(shape):
        raise HyperparameterError(f"{method} rank = {rank} must be in [1, {min(shape)}] for a weight of shape {shape}: "
                         f"set optim.args.rank (e.g. --set optim.args.rank={max(1, min(shape) // 4)})")
