"""The CUDA twin of test_release.py's Triton-in-release test: the compiled kernels inside real release hooks.

test_release.py runs the kernels in Triton's interpreter on CPU tensors, so it skips on a GPU machine (where
triton is imported compiled); this file runs the same steps on CUDA tensors and skips without a GPU.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernels)")


def test_release_step_through_the_compiled_kernels_tracks_the_torch_path():
    # Same recipe, data and steps as the CPU test. Dequantize is bit-exact, so the first loss is identical;
    # SR draws differ (Philox in the kernel vs torch's generator) and the fused APOLLO statistics sum in
    # another order, so later losses agree statistically: within 0.05 nats over 6 steps of the tiny Llama.
    from qtrain.build import build_updater
    from qtrain.config import TrainConfig
    from qtrain.evaluation import lm_loss
    from qtrain.model import build_model
    from qtrain.release import attach_release

    device = torch.device("cuda")
    losses = {}
    for kernels in ("torch", "triton"):
        cfg = TrainConfig.from_toml("recipes/tiny.toml", [f"quant.kernels={kernels}", "model.vocab_size=256"])
        model = build_model(cfg.model, cfg.quant, device)
        updater = build_updater(model, cfg)
        updater.matrix_method.kernels = kernels  # APOLLO's statistics take the same backend as the int8 update
        attach_release(updater)
        x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0)).to(device)
        losses[kernels] = []
        for _ in range(6):
            updater.begin_step(0.01)
            loss = lm_loss(model, x, x, torch.float32)
            loss.backward()
            updater.finish_step()
            losses[kernels].append(loss.item())
    assert losses["triton"][0] == losses["torch"][0]
    assert max(abs(a - b) for a, b in zip(losses["triton"], losses["torch"])) < 0.05, losses
    assert losses["triton"][-1] < losses["triton"][0] - 0.2  # it learns
