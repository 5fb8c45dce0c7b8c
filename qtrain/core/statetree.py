"""Nested state (dicts, lists, tuples of tensors and scalars): the one walker of qtrain.

`tensors` lists the tensors of such a tree and `map_tensors` rebuilds it with each tensor replaced (the
optimizer states an Updater moves, FSDP2 gathers or slices, the estimator counts); both walk with
torch.utils._pytree. `flatten` / `unflatten` split a tree into flat tensors + a JSON skeleton for checkpoints:
every tensor in safetensors (or torch.distributed.checkpoint), everything else (steps, seeds, hyperparameters)
in JSON. Dict keys keep their type (torch optimizer states are keyed by int), tuples stay tuples.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.utils._pytree as pytree
from torch import Tensor


def tensors(obj: Any) -> list[Tensor]:
    """Every tensor in obj, in traversal order."""
    return [t for t in pytree.tree_leaves(obj) if isinstance(t, Tensor)]


def map_tensors(obj: Any, fn: Callable[[Any, Tensor], Any]) -> Any:
    """obj with each tensor v replaced by fn(key, v), key the innermost dict key above it (None at the top)."""
    def visit(path, leaf):
        if not isinstance(leaf, Tensor):
            return leaf
        keys = [k.key for k in path if isinstance(k, pytree.MappingKey)]
        return fn(keys[-1] if keys else None, leaf)

    return pytree.tree_map_with_path(visit, obj)


def flatten(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Returns the JSON skeleton of obj; its tensors go into `tensors` under keys starting with prefix."""
    if isinstance(obj, Tensor):
        key = f"{prefix}"
        if key in tensors:
            raise ValueError(f"duplicate state key {key}")
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {prefix}: state must hold tensors and scalars only")


def unflatten(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton
