"""FusedAdamW (one update for every norm weight and bias) and the sync-free 8-bit Adam of the float tensors."""

import pytest
import torch
from conftest import quant_cfg, tiny_model_cfg

from qtrain.core.sync_probe import cpu_syncs
from qtrain.model.builder import build_model
from qtrain.optim import apollo_mini
from qtrain.optim.float_adam import adam8bit_no_sync_class, float_optimizer_factory
from qtrain.optim.fused_adam import FusedAdamW
from qtrain.quant.stochastic_round import stochastic_round_to_bf16
from qtrain.update.updater import Updater

SHAPES = [(64,), (3,), (4096,), (1000,), (17,)]  # odd sizes: the flat buffers' slices start anywhere


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for i, s in enumerate(SHAPES)}


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(p.shape, generator=gen).to(p.dtype) for n, p in params.items()}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fp32_group_is_bit_identical_to_torch_adamw_per_tensor(weight_decay):
    fused, ref = _params(), _params()
    group = FusedAdamW(fused, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    opts = {n: torch.optim.AdamW([p], lr=0.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay,
                                 foreach=False) for n, p in ref.items()}
    for step in range(6):
        lr = 0.01 * (step + 1)
        for n, g in _grads(fused, step).items():
            fused[n].grad, ref[n].grad = g.clone(), g.clone()
            group.slots[n].step()  # stages the gradient only
            opts[n].param_groups[0]["lr"] = lr
            opts[n].step()
        group.step(lr)
        for n in fused:
            assert torch.equal(fused[n], ref[n]), (step, n)
            st = opts[n].state[ref[n]]
            assert torch.equal(group.slots[n].exp_avg, st["exp_avg"]) and torch.equal(group.slots[n].exp_avg_sq,
                                                                                      st["exp_avg_sq"])


def test_bf16_group_keeps_fp32_moments_and_rounds_stochastically():
    fused = _params(torch.bfloat16)
    ref32 = {n: torch.nn.Parameter(p.detach().float()) for n, p in fused.items()}
    group = FusedAdamW(fused)
    opts = {n: torch.optim.AdamW([p], lr=0.01, weight_decay=0.0, foreach=False) for n, p in ref32.items()}
    assert group.exp_avg.dtype == torch.float32
    grads = _grads(fused, 0)
    for n, g in grads.items():
        fused[n].grad, ref32[n].grad = g, g.float()
        group.slots[n].step()
        opts[n].step()
    group.step(0.01, torch.Generator().manual_seed(7))
    flat32 = torch.cat([ref32[n].detach().reshape(-1) for n in fused])  # the fp32 AdamW result
    expect = stochastic_round_to_bf16(flat32, torch.Generator().manual_seed(7))
    assert torch.equal(torch.cat([fused[n].detach().reshape(-1) for n in fused]), expect)


def test_step_needs_every_gradient_and_the_state_dict_round_trips():
    a, b = _params(), _params()
    ga, gb = FusedAdamW(a), FusedAdamW(b)
    a["p0"].grad = torch.ones(64)
    ga.slots["p0"].step()
    with pytest.raises(RuntimeError, match=r"without the gradients of \['p1', 'p2', 'p3', 'p4'\]"):
        ga.step(0.01)
    ga.received.clear()

    def run(params, group, steps):
        for step in steps:
            for n, g in _grads(params, step).items():
                params[n].grad = g
                group.slots[n].step()
            group.step(0.001)

    run(a, ga, range(3))
    sd = {n: s.state_dict() for n, s in ga.slots.items()}
    assert sd["p2"]["state"][0]["step"].item() == 3.0 and set(sd["p2"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    with torch.no_grad():
        for n in b:
            b[n].copy_(a[n])
    for n, s in gb.slots.items():
        s.load_state_dict(sd[n])
    assert gb.steps == 3
    run(a, ga, range(3, 5))
    run(b, gb, range(3, 5))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_loads_per_tensor_torch_adamw_and_bitsandbytes_adam8bit_states():
    ref = _params()
    torch_opts = {n: torch.optim.AdamW([p], lr=0.01, weight_decay=0.0, foreach=False) for n, p in ref.items()}
    bnb_opts = {n: adam8bit_no_sync_class()([torch.nn.Parameter(p.detach().clone())], lr=0.01) for n, p in ref.items()}
    for step in range(2):
        for n, g in _grads(ref, step).items():
            ref[n].grad = g
            torch_opts[n].step()
            q = bnb_opts[n].param_groups[0]["params"][0]
            q.grad = g.clone()
            bnb_opts[n].step()
    for source in (torch_opts, bnb_opts):
        group = FusedAdamW(_params())
        for n, s in group.slots.items():
            s.load_state_dict(source[n].state_dict())
        assert group.steps == 2
        for n, s in group.slots.items():
            m = torch_opts[n].state[ref[n]]["exp_avg"]
            # torch: exact; bitsandbytes: its 8-bit blockwise moments (fp32 below 4096 elements), dequantized
            tol = 0 if source is torch_opts or ref[n].numel() < 4096 else 0.02 * m.abs().max().item()
            torch.testing.assert_close(s.exp_avg, m, rtol=0, atol=tol + 1e-7 * (source is bnb_opts))


def test_adam8bit_no_sync_matches_bitsandbytes_and_makes_no_sync():
    import bitsandbytes as bnb

    for n in (100, 5000):  # 32-bit state below min_8bit_size = 4096, 8-bit blockwise from there
        p1, p2 = (torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n))) for _ in range(2))
        ours, theirs = adam8bit_no_sync_class()([p1], lr=0.01), bnb.optim.Adam8bit([p2], lr=0.01)
        for step in range(3):
            g = torch.randn(n, generator=torch.Generator().manual_seed(step))
            p1.grad, p2.grad = g.clone(), g.clone()
            mine = cpu_syncs(ours.step)
            bnbs = cpu_syncs(theirs.step)
            assert mine.total == 0, mine.where
            assert bnbs.explicit == 1, bnbs.where  # the probe sees bitsandbytes' per-parameter sync_gpu
            assert torch.equal(p1, p2)
        assert ours.state_dict()["state"][0].keys() == theirs.state_dict()["state"][0].keys()


def test_updater_puts_every_vector_in_one_fused_group_stepped_once_per_step():
    model = build_model(tiny_model_cfg(), quant_cfg(), seed=0)
    updater = Updater(model, apollo_mini(update_proj_gap=2), float_optimizer_factory("adam8bit"))
    vectors = sorted(n for n, p in updater.floats.items() if p.dim() == 1)
    assert len(updater.fused_floats) == 1 and sorted(updater.fused_floats[0].names) == vectors
    assert type(updater.float_opts["lm_head.weight"]).__name__ == "Adam8bitNoSync"
    calls = []
    real = updater.fused_floats[0].step
    updater.fused_floats[0].step = lambda *a, **k: calls.append(updater.step) or real(*a, **k)
    x = torch.randint(0, 64, (2, 16))
    for _ in range(2):
        updater.begin_step(0.01)
        model(input_ids=x, labels=x).loss.backward()
        updater.finish_step()
    assert calls == [0, 1]
