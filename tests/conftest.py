import os
from types import SimpleNamespace

import pytest
import torch

# Triton fixes interpreted vs compiled mode when it is first imported, and qtrain imports it with the
# package: without a GPU, set interpreter mode before any test module imports qtrain, so the kernels'
# CPU tests run in this process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def tiny_model_cfg(**over):
    """A 2-layer, hidden-64 Llama config (duck-typed [model] section)."""
    base = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=0,
                max_seq_len=32, rope_theta=10000.0, init_std=0.02, rms_norm_eps=1e-6, tie_embeddings=False,
                attn_implementation="sdpa", float_dtype="float32")
    return SimpleNamespace(**{**base, **over})


def quant_cfg(enabled=True, group_size=64, meta_dtype="float32"):
    return SimpleNamespace(enabled=enabled, group_size=group_size, meta_dtype=meta_dtype)
