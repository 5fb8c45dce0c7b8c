"""direction() reads no tensor value on the host (docs/algorithms.md §2): a CPU proxy for "no device sync".

On CUDA, `.item()`, `float(t)`, `if t:` or Python `max(t, x)` each block until the GPU catches up. Here
every such conversion raises, so a method that decides anything from a tensor value in Python fails on
CPU too. (SVD/QR/eigh/multinomial at refresh steps sync inside their kernels; that cost is inherent.)
"""

import pytest
import torch

from qtrain.optim import build_method

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
CASES = [
    ("apollo_svd", {"rank": 3, "update_proj_gap": 2}),
    ("galore", {"rank": 3, "update_proj_gap": 2, "i3s": True}),
    ("fira", {"rank": 3, "update_proj_gap": 2, "i3s": True}),
    ("racs", {}),
    ("alice", {"rank": 4, "leading": 2, "update_interval": 2}),
    ("alice0", {"rank": 4, "leading": 2, "update_interval": 2}),
]


@pytest.mark.parametrize("shape", [(10, 14), (14, 10)])
@pytest.mark.parametrize("name, args", CASES, ids=[c[0] for c in CASES])
def test_direction_never_reads_tensor_values_on_the_host(name, args, shape, monkeypatch):
    method = build_method(name, args)
    state = method.init_state(shape, torch.device("cpu"), uid=1)
    grads = [torch.randn(shape, generator=torch.Generator().manual_seed(t)) for t in range(5)]

    def host_read(*_args, **_kwargs):
        raise AssertionError(f"{name}.direction() read a tensor value on the host")

    for attr in HOST_READS:
        monkeypatch.setattr(torch.Tensor, attr, host_read)
    updates = [method.direction(g, state) for g in grads]  # includes refresh/switch steps
    monkeypatch.undo()
    assert all(torch.isfinite(u.full(g)).all() for u, g in zip(updates, grads))
