"""Optimizer state of every matrix method: footprint (docs/algorithms.md §4-§11 figures), checkpointability, bitwise resume."""

import copy
import functools
import json

import pytest
import safetensors.torch
import torch
from conftest import closed_loop_grad

from qtrain.optim import MATRIX_METHODS, apply_update_, build_method

META = torch.device("meta")
M, N = 4096, 11008  # LLaMA-7B down_proj (m < n: direct branch); a = 4096, b = 11008

# name, [optim.args], floats per the §4-§11 formula, the figure printed there
MEMORY_CASES = [
    ("apollo", {"rank": 256}, 2 * 256 * N + 1, "21.5 MiB"),  # §4: 2rb + 1 (P seeded)
    ("apollo_mini", {}, 2 * N + 1, "86 KiB"),  # §5: 2b + 1
    ("apollo_svd", {"rank": 256}, 256 * M + 2 * 256 * N + 1, "25.5 MiB"),  # §4/§6: 2rb + 1 + ra (P stored)
    ("galore", {"rank": 256}, 256 * M + 2 * 256 * N, "25.5 MiB"),  # §7: ra + 2rb
    ("fira", {"rank": 256}, 256 * M + 2 * 256 * N + 1, "25.5 MiB"),  # §8: ra + 2rb + 1
    ("racs", {}, M + N + 1, "59 KiB"),  # §10: m + n + 1
    ("alice", {"rank": 512}, M * 512 + 512**2 + 2 * 512 * N + N + 1, "52.0 MiB"),  # §11: mr + r² + 2rn + n + 1
    ("alice0", {"rank": 512}, M * 512 + 2 * 512 * N + N + 1, "51.0 MiB"),  # §11: mr + 2rn + n + 1
]


def state_bytes(state: dict) -> tuple[int, int]:
    """(floats, bytes) over the state's tensors; bytes per element from the dtype, never a literal."""
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() for t in tensors), sum(t.numel() * t.dtype.itemsize for t in tensors)


def human(nbytes: int) -> str:
    return f"{nbytes / 2**10:.0f} KiB" if nbytes < 2**20 else f"{nbytes / 2**20:.1f} MiB"


@pytest.mark.parametrize("name, args, floats, printed", MEMORY_CASES, ids=[c[0] for c in MEMORY_CASES])
def test_state_footprint_on_meta_matches_the_spec(name, args, floats, printed):
    """init_state allocates every persistent tensor up front, so a fresh state on meta is the footprint."""
    method = build_method(name, args)
    method.validate((M, N))
    state = method.init_state((M, N), META, uid=1)
    assert all(v.device == META and v.dtype == torch.float32 for v in state.values() if isinstance(v, torch.Tensor))
    n_floats, n_bytes = state_bytes(state)
    print(f"\n{name:12s} 4096x11008 {n_floats:>10d} floats = {human(n_bytes)}", end="")
    assert n_floats == floats  # n_bytes = 4 · n_floats follows from the fp32 check above
    assert human(n_bytes) == printed


# ---------------------------------------------------------------- resume and checkpointability

GAP = 3  # update_proj_gap T (GaLore family) and update_interval K (Alice)
RESUME_CASES = [
    ("apollo", {"rank": 3, "update_proj_gap": GAP}),
    ("apollo_mini", {"update_proj_gap": GAP}),
    ("apollo_svd", {"rank": 3, "update_proj_gap": GAP}),
    ("galore", {"rank": 3, "update_proj_gap": GAP}),
    ("galore", {"rank": 3, "update_proj_gap": GAP, "i3s": True}),
    ("fira", {"rank": 3, "update_proj_gap": GAP, "i3s": True, "fira_residual": "paper"}),
    ("fira", {"rank": 3, "update_proj_gap": GAP}),
    ("racs", {}),
    ("alice", {"rank": 4, "leading": 2, "update_interval": GAP}),
    ("alice", {"rank": 4, "leading": 2, "update_interval": GAP, "rebase_q": True}),
    ("alice0", {"rank": 4, "leading": 1, "update_interval": GAP}),
]
RESUME_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in a.items() if k not in ('rank', 'update_proj_gap'))}"
              for n, a in RESUME_CASES]
STEPS = 2 * GAP + 3


toy_grad = functools.partial(closed_loop_grad, seed_base=4000)


def run(method, state, w, steps: range) -> None:
    for t in steps:
        g = toy_grad(w, t)
        apply_update_(w, method.direction(g, state), g, 0.01, 0.01)


def save_load(state: dict) -> dict:
    """Through the checkpoint formats: tensors to safetensors bytes, ints/floats to JSON."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    assert all(type(v) in (int, float) for v in scalars.values()), scalars  # never objects
    loaded = safetensors.torch.load(safetensors.torch.save(tensors))
    return {**loaded, **json.loads(json.dumps(scalars))}


@pytest.mark.parametrize("shape", [(10, 14), (14, 10)])
@pytest.mark.parametrize("name, args", RESUME_CASES, ids=RESUME_IDS)
def test_resume_is_bitwise(name, args, shape):
    """2T+3 straight steps vs k steps, save/load, a fresh method object, the remaining steps."""
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    straight = w0.clone()
    method = build_method(name, args, seed=17)
    method.validate(shape)
    run(method, method.init_state(shape, torch.device("cpu"), uid=42), straight, range(1, STEPS + 1))
    for k in (1, GAP, GAP + 1, 2 * GAP):  # across refresh/switch boundaries
        w = w0.clone()
        first = build_method(name, args, seed=17)
        state = first.init_state(shape, torch.device("cpu"), uid=42)
        run(first, state, w, range(1, k + 1))
        resumed = save_load(copy.deepcopy(state))
        run(build_method(name, args, seed=17), resumed, w, range(k + 1, STEPS + 1))
        assert torch.equal(w, straight), f"resume after k = {k} steps diverged"


@pytest.mark.parametrize("name, args", RESUME_CASES, ids=RESUME_IDS)
def test_fresh_state_is_the_persistent_footprint(name, args):
    """The state after refreshes/switches has exactly the tensors (names, shapes, fp32) of init_state."""
    method = build_method(name, args)
    fresh = method.init_state((10, 14), torch.device("cpu"), uid=1)
    state = copy.deepcopy(fresh)
    run(method, state, torch.randn(10, 14), range(1, STEPS + 1))
    assert state.keys() == fresh.keys()
    for key, value in fresh.items():
        if isinstance(value, torch.Tensor):
            assert state[key].shape == value.shape and state[key].dtype == torch.float32, key
        else:
            assert type(state[key]) is type(value), key


def test_registry_names_and_unknown_keys():
    for name in ("apollo_svd", "galore", "fira", "racs", "alice", "alice0"):
        assert name in MATRIX_METHODS
        assert build_method(name, {}, seed=3).seed == 3
    assert build_method("alice0", {}).beta3 == 0.0
    with pytest.raises(ValueError, match="did you mean 'rank'"):
        build_method("galore", {"rnak": 4})
