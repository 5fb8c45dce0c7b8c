"""Layer-wise gradient release (docs/algorithms.md §13) against ordinary stepping, on a tiny int8 Llama."""

import pytest
import torch
from conftest import quant_cfg, tiny_model_cfg

from qtrain.model.builder import build_model, enable_activation_checkpointing
from qtrain.optim import apollo_mini
from qtrain.optim.adam import Adam
from qtrain.optim.float_adam import float_optimizer_factory
from qtrain.quant.linear import Int8Linear
from qtrain.train.schedule import lr_at
from qtrain.update.release import attach_release
from qtrain.update.updater import Updater

STEPS = 5


def _batches(n, vocab=64, B=2, T=16):
    gen = torch.Generator().manual_seed(123)
    return [torch.randint(0, vocab, (B, T), generator=gen) for _ in range(n)]


def _train(release: bool, quant: bool, float_opt="adamw", steps=STEPS, spy=None, float_dtype="float32",
           checkpointing=False):
    model = build_model(tiny_model_cfg(float_dtype=float_dtype), quant_cfg(enabled=quant), seed=0)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    method = apollo_mini(rank=1, scale=128.0, update_proj_gap=2, bias_correction="inside", eps=1e-8)
    bf16_adam = Adam(eps=1e-8) if float_dtype == "bfloat16" else None
    updater = Updater(model, method, float_optimizer_factory(float_opt), seed=5, low_precision_adam=bf16_adam,
                      embedding_method=method if float_dtype == "bfloat16" else None)
    if spy is not None:
        spy(updater)
    if release:
        attach_release(updater)
    losses = []
    for k, x in enumerate(_batches(steps)):
        updater.begin_step(lr_at(k, 0.01, steps, warmup_frac=0.2))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        updater.finish_step()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("quant", [True, False])
def test_release_equals_ordinary_step(quant):
    m_rel, l_rel = _train(release=True, quant=quant)
    m_std, l_std = _train(release=False, quant=quant)
    assert l_rel == l_std  # identical per-step losses
    for (name, a), (_, b) in zip(m_rel.state_dict().items(), m_std.state_dict().items()):
        assert torch.equal(a, b), name  # int8 codes with the same SR seed: identical; fp32: exact
    m0 = build_model(tiny_model_cfg(), quant_cfg(enabled=quant), seed=0)
    changed = [n for n, t in m_rel.state_dict().items() if not torch.equal(t, m0.state_dict()[n])]
    assert len(changed) > 0.9 * len(m0.state_dict()) - 2  # nearly every tensor moved (rotary buffers don't)


def test_release_equals_ordinary_step_with_bf16_float_tensors():
    # bf16 embedding (APOLLO-Mini) and norms/lm_head (fp32-state Adam), all applied with seeded SR
    m_rel, l_rel = _train(release=True, quant=True, float_dtype="bfloat16")
    m_std, l_std = _train(release=False, quant=True, float_dtype="bfloat16")
    assert l_rel == l_std
    assert m_rel.lm_head.weight.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(m_rel.state_dict().items(), m_std.state_dict().items()):
        assert torch.equal(a, b), name


def test_activation_checkpointing_changes_nothing_but_memory():
    # The recompute in backward runs before any weight of its block is updated, so the int8 release
    # hooks see the same weights and gradients: identical losses and tensors.
    m_ck, l_ck = _train(release=True, quant=True, checkpointing=True)
    m_pl, l_pl = _train(release=True, quant=True)
    assert l_ck == l_pl
    assert all(torch.equal(a, b) for a, b in zip(m_ck.state_dict().values(), m_pl.state_dict().values()))


def test_release_with_bnb_adam8bit_equals_ordinary_step():
    _, l_rel = _train(release=True, quant=True, float_opt="adam8bit", steps=3)
    _, l_std = _train(release=False, quant=True, float_opt="adam8bit", steps=3)
    assert l_rel == l_std


def test_every_hook_sees_the_scheduled_lr_and_one_gradient_at_a_time():
    seen = []  # (step, name, lr, number of float grads alive, number of int8 grads alive)

    def spy(updater):
        orig_int8, orig_float = updater.update_int8, updater.update_float

        def alive():
            return sum(p.grad is not None for p in updater.floats.values())

        def int8(layer, grad):
            seen.append((updater.step, layer.name, updater.lr, alive()))
            orig_int8(layer, grad)

        def flt(name, p):
            seen.append((updater.step, name, updater.lr, alive()))
            orig_float(name, p)

        updater.update_int8, updater.update_float = int8, flt

    model, _ = _train(release=True, quant=True, spy=spy)
    n_tensors = 14 + sum(1 for _ in model.parameters())
    assert len(seen) == STEPS * n_tensors  # every tensor exactly once per step
    for step, name, lr, alive in seen:
        assert lr == lr_at(step, 0.01, STEPS, warmup_frac=0.2), (step, name)
        assert alive <= 1, (step, name)  # at most one float gradient alive (int8 dW never stored)
    assert seen[0][1] == "lm_head.weight" and seen[n_tensors - 1][1] == "model.embed_tokens.weight"


def test_first_layer_gets_its_gradient_when_input_needs_none():
    layer = Int8Linear.from_float(torch.randn(8, 64), group_size=64)
    got = []
    layer.grad_sink = lambda lyr, dw: got.append(dw)
    x = torch.randn(3, 64)  # requires_grad=False
    layer(x).sum().backward()
    assert len(got) == 1
    torch.testing.assert_close(got[0], torch.ones(3, 8).t() @ x)


def test_second_backward_in_one_release_step_is_refused():
    model = build_model(tiny_model_cfg(), quant_cfg(), seed=0)
    updater = Updater(model, apollo_mini(update_proj_gap=2), float_optimizer_factory("adamw"))
    attach_release(updater)
    updater.begin_step(0.01)
    x = _batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    with pytest.raises(RuntimeError, match="updated twice.*release = false"):
        model(input_ids=x, labels=x).loss.backward()


def test_missing_gradient_is_reported():
    model = build_model(tiny_model_cfg(), quant_cfg(), seed=0)
    updater = Updater(model, apollo_mini(update_proj_gap=2), float_optimizer_factory("adamw"))
    updater.begin_step(0.01)
    with pytest.raises(RuntimeError, match="no gradient reached"):
        updater.finish_step()


@pytest.mark.slow
def test_release_step_through_the_triton_kernels_tracks_the_torch_path(kernel_device):
    # The fused kernels inside real release hooks: in Triton's interpreter on CPU, compiled on CUDA. Dequantize
    # is bit-exact, so the first loss is identical; SR draws differ (Philox in the kernel vs torch's generator)
    # and the fused APOLLO statistics sum in another order, so later losses agree statistically: within 0.05
    # nats over 6 steps of the tiny Llama.
    from qtrain.config.recipe import TrainConfig
    from qtrain.model.loss import lm_loss
    from qtrain.update.build import build_updater

    losses = {}
    for kernels in ("torch", "triton"):
        cfg = TrainConfig.from_toml("recipes/tiny.toml", [f"quant.kernels={kernels}", "model.vocab_size=256"])
        model = build_model(cfg.model, cfg.quant, kernel_device)
        updater = build_updater(model, cfg)  # APOLLO's statistics take the same backend as the int8 update
        attach_release(updater)
        x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)).to(kernel_device)
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
