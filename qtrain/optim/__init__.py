"""qtrain optimizers: pure update functions, methods, and standalone torch.optim.Optimizer classes."""

from qtrain.optim.apollo import APOLLO, Apollo, apollo_mini, apollo_scaling
from qtrain.optim.base import Method, MethodOptimizer, Update, apply_update_
from qtrain.optim.registry import MATRIX_METHODS, build_method

__all__ = [
    "APOLLO",
    "Apollo",
    "MATRIX_METHODS",
    "Method",
    "MethodOptimizer",
    "Update",
    "apollo_mini",
    "apollo_scaling",
    "apply_update_",
    "build_method",
]
