"""A whole training step reads no tensor value on the host: the CPU stand-in for "no device sync".

On CUDA, `.item()`, `float(t)`, `if t:` or `t.tolist()` block until the GPU catches up. Here every such
conversion raises during one step of the real trainer pieces (transformers' Llama forward, the int8
autograd function, release hooks with APOLLO(-Mini), SR requantization, the float optimizers), so any
host read that would sync on a GPU fails on CPU too. Logging (every log_every steps) is outside the step.
The check on the GPU itself is `tools/bench_step.py` (torch.cuda.set_sync_debug_mode("error")).
"""

import sys

import pytest
import torch

from qtrain.config.recipe import TrainConfig
from qtrain.model.builder import build_model
from qtrain.model.loss import lm_loss
from qtrain.update.build import build_updater
from qtrain.update.release import attach_release

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")
RECIPE = TrainConfig.from_toml("recipes/tiny.toml")


@pytest.mark.parametrize("overrides", [
    [],  # APOLLO-Mini, AdamW for the float tensors
    ["optim.method=apollo", "optim.args.rank=4", "optim.args.scale_type=channel", "model.float_dtype=bfloat16",
     "optim.embedding_optimizer=same_as_matrices", "train.activation_checkpointing=true"],
], ids=["apollo_mini", "apollo_channel_bf16_floats_ckpt"])
def test_one_release_step_reads_nothing_on_the_host(overrides, monkeypatch):
    cfg = RECIPE.apply_overrides(overrides + ["model.vocab_size=256"])
    model = build_model(cfg.model, cfg.quant, "cpu")
    if cfg.train.activation_checkpointing:
        from qtrain.model.builder import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    updater = build_updater(model, cfg)
    attach_release(updater)
    x = torch.randint(0, 256, (2, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def host_read(*_args, **_kwargs):
        caller = sys._getframe(1)
        if caller.f_code.co_name == "_get_value" and "torch/optim" in caller.f_code.co_filename:
            return real_item(*_args)  # torch's Adam step counter: a CPU tensor even on CUDA (capturable=False)
        raise AssertionError("a training step read a tensor value on the host (a device sync on CUDA)")

    real_item = torch.Tensor.item

    for step in range(2):  # the first step creates optimizer state lazily; the second is a steady step
        updater.begin_step(0.01)
        for attr in HOST_READS:
            monkeypatch.setattr(torch.Tensor, attr, host_read)
        lm_loss(model, x, x, torch.float32).backward()
        updater.finish_step()
        monkeypatch.undo()
    changed = sum(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert changed >= len(updater.int8) + len(updater.floats)  # every tensor was updated
