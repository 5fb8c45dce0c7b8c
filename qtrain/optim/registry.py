"""Name -> matrix method, for recipes (`[optim] method = "..."` with `[optim.args]`)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

from qtrain.errors import HyperparameterError
from qtrain.optim.alice import AliceMethod, alice0
from qtrain.optim.apollo import Apollo, apollo_mini
from qtrain.optim.apollo_svd import ApolloSVDMethod
from qtrain.optim.base import Method
from qtrain.optim.fira import FiraMethod
from qtrain.optim.galore import GaLoreMethod
from qtrain.optim.racs import RacsMethod

# name -> (factory, dataclass whose fields are the accepted [optim.args] keys)
MATRIX_METHODS: dict[str, tuple[Callable[..., Method], type[Method]]] = {
    "apollo": (Apollo, Apollo),
    "apollo_mini": (apollo_mini, Apollo),
    "apollo_svd": (ApolloSVDMethod, ApolloSVDMethod),
    "galore": (GaLoreMethod, GaLoreMethod),
    "fira": (FiraMethod, FiraMethod),
    "racs": (RacsMethod, RacsMethod),
    "alice": (AliceMethod, AliceMethod),
    "alice0": (alice0, AliceMethod),
}


def build_method(name: str, args: dict[str, Any], weight_decay: float = 0.0, seed: int = 0) -> Method:
    """Instantiate a method; unknown names/args raise HyperparameterError naming the closest valid one."""
    if name not in MATRIX_METHODS:
        close = difflib.get_close_matches(name, MATRIX_METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise HyperparameterError(f"[optim] method = {name!r} is unknown{hint}; choose one of {sorted(MATRIX_METHODS)}")
    factory, cls = MATRIX_METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in args:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise HyperparameterError(f"[optim.args] {key!r} is not a {name} hyperparameter{hint}; valid: {sorted(fields)}. "
                             f"Remove it from [optim.args] (a command-line optim.method override starts from "
                             f"the method's defaults by itself)")
    kwargs = dict(args)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    if "seed" in fields:
        kwargs.setdefault("seed", seed)
    return factory(weight_decay=weight_decay, **kwargs)
