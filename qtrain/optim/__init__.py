"""qtrain optimizers: pure update functions, methods, and standalone torch.optim.Optimizer classes."""

from qtrain.optim.alice import Alice, Alice0, AliceMethod, alice0, alice_compensation_, alice_update
from qtrain.optim.apollo import APOLLO, Apollo, apollo_mini, apollo_scaling
from qtrain.optim.apollo_svd import APOLLOSVD, ApolloSVDMethod
from qtrain.optim.base import Method, Update, apply_update_
from qtrain.optim.fira import Fira, FiraMethod, fira_update
from qtrain.optim.galore import GaLore, GaLoreMethod, galore_update
from qtrain.optim.method_optimizer import MethodOptimizer
from qtrain.optim.racs import RACS, RacsMethod, racs_update
from qtrain.optim.registry import MATRIX_METHODS, build_method

__all__ = [
    "APOLLO",
    "APOLLOSVD",
    "Alice",
    "Alice0",
    "AliceMethod",
    "Apollo",
    "ApolloSVDMethod",
    "Fira",
    "FiraMethod",
    "GaLore",
    "GaLoreMethod",
    "MATRIX_METHODS",
    "Method",
    "MethodOptimizer",
    "RACS",
    "RacsMethod",
    "Update",
    "alice0",
    "alice_compensation_",
    "alice_update",
    "apollo_mini",
    "apollo_scaling",
    "apply_update_",
    "build_method",
    "fira_update",
    "galore_update",
    "racs_update",
]
