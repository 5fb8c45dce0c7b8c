"""The chunked loss (qtrain.model.loss): equal to the plain lm_head + cross-entropy within a derived fp32 bound,
and never holding the full-size fp32 logits or their gradient."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from qtrain.config.recipe import TrainConfig
from qtrain.core.memory_probe import cpu_peak_bytes
from qtrain.model import loss as loss_mod
from qtrain.model.builder import build_model, float_parameters, int8_layers
from qtrain.model.loss import IGNORE_INDEX, linear_cross_entropy, lm_loss, vocab_chunk

U = 2.0**-24  # fp32 unit roundoff
pytestmark = pytest.mark.usefixtures("one_thread")


def head_bounds(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Elementwise bounds of |chunked - plain| for (loss, dL/dh, dL/dW), all in fp32 (N tokens, C features, V
    vocabulary), from the reference computed in float64.

    Both paths compute the same quantities with reassociated sums; each fp32 sum of K terms is within
    γ_K ≈ K·u of the sum of |terms| (Higham, Thm 3.1), so the two paths differ by at most twice that:
    - logits z = h Wᵀ: δz = 2·C·u·max(|h| |W|ᵀ) (the matmul may block C differently per chunk);
    - logsumexp (online max and rescaled sums vs log_softmax's two passes): δlse = δz + (V + 4)·u + 2u·max|lse|;
    - loss = mean_n(lse_n - z_n,y): δz + δlse + (N + 2)·u·max|lse - z_y|;
    - p = exp(z - lse) has relative error ε_p = δz + δlse + 2u, so |Δg| <= s·(ε_p·p + u) with s = 1/#valid;
    - dh = g W: |Δg| |W| + 2·V·u·(|g| |W|);  dW = gᵀ h: |Δg|ᵀ |h| + 2·N·u·(|g|ᵀ |h|).
    """
    N, C = h.shape
    V = w.shape[0]
    h64, w64 = h.double(), w.double()
    z = h64 @ w64.T
    lse = z.logsumexp(1)
    valid = y != IGNORE_INDEX
    s = 1.0 / valid.sum().item()
    p = (z - lse[:, None]).exp()
    onehot = F.one_hot(y.clamp(min=0), V).double() * valid[:, None]
    g = (p - onehot) * s * valid[:, None]
    dz = 2 * C * U * (h64.abs() @ w64.abs().T).max().item()
    dlse = dz + (V + 4) * U + 2 * U * lse.abs().max().item()
    nll = lse - z.gather(1, y.clamp(min=0)[:, None])[:, 0]
    loss = dz + dlse + (N + 2) * U * nll[valid].abs().max().item()
    eps_p = dz + dlse + 2 * U
    dg = s * (eps_p * p + U) * valid[:, None]
    dh = dg @ w64.abs() + 2 * V * U * (g.abs() @ w64.abs())
    dw = dg.T @ h64.abs() + 2 * N * U * (g.abs().T @ h64.abs())
    return loss, dh, dw


@pytest.mark.parametrize("width", [1000, 256, 77])
def test_chunked_head_equals_the_plain_one_within_the_derived_bound(width):
    torch.manual_seed(0)
    N, C, V = 96, 32, 1000
    h = torch.randn(N, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.3).requires_grad_()
    y = torch.randint(0, V, (N,))
    y[::7] = IGNORE_INDEX  # prompt / padding positions
    y[1] = V - 1  # a target in the last, narrower chunk
    plain = F.cross_entropy(F.linear(h, w).float(), y)
    gh, gw = torch.autograd.grad(plain, (h, w))
    got = linear_cross_entropy(h, w, y, torch.float32, width)
    ch, cw = torch.autograd.grad(got, (h, w))
    b_loss, b_h, b_w = head_bounds(h.detach(), w.detach(), y)
    # the bounds are tight enough to mean something: far below the gradients themselves
    assert b_h.max() < 1e-3 * gh.abs().max() and b_w.max() < 1e-3 * gw.abs().max() and b_loss < 1e-3 * plain
    assert abs(got.item() - plain.item()) <= b_loss
    assert ((ch - gh).abs().double() <= b_h).all()
    assert ((cw - gw).abs().double() <= b_w).all()


def test_a_missing_one_hot_breaks_the_bound():
    """The bound catches a wrong gradient: the same check on a chunked result missing its targets' -1 fails."""
    torch.manual_seed(1)
    N, C, V = 64, 16, 600
    h, w, y = torch.randn(N, C), torch.randn(V, C) * 0.3, torch.randint(0, V, (N,))
    hr = h.clone().requires_grad_()
    gh, = torch.autograd.grad(F.cross_entropy(F.linear(hr, w), y), (hr,))
    _, b_h, _ = head_bounds(h, w, y)
    p = torch.softmax(h @ w.T, 1) / N  # softmax without the one-hot: the classic chunk-boundary bug
    assert not ((p @ w - gh).abs().double() <= b_h).all()


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def tiny(overrides=()) -> TrainConfig:
    return TrainConfig.from_toml(RECIPES / "tiny.toml", ["model.vocab_size=4096", *overrides])


def grads_of(cfg: TrainConfig, x, y, budget, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    monkeypatch.setattr(loss_mod, "LOSS_CHUNK_ELEMS", budget)
    model = build_model(cfg.model, cfg.quant, "cpu", seed=3)
    model.train()
    loss = lm_loss(model, x, y, torch.float32)
    loss.backward()
    grads = {n: p.grad for n, p in float_parameters(model).items()}
    grads.update({n: layer.weight_grad for n, layer in int8_layers(model).items()})
    return loss.detach(), grads


@pytest.mark.parametrize("tied", [False, True])
def test_lm_loss_chunked_equals_plain_for_every_gradient(tied, monkeypatch):
    """Whole model, tied and untied, -100 targets: loss and every parameter's gradient.

    The loss and lm_head's gradient are bounded elementwise by head_bounds (test above). Everything below the
    head gets dL/dh through the same backward G, linear in dL/dh, so its difference is G(Δh); normwise
    ‖G(Δh)‖ <= ‖G‖·‖Δh‖ while ‖G(dh)‖ ~ ‖G‖·‖dh‖: relative error <= κ·max|Δh|/‖dh‖ with the bound for Δh,
    κ = 16 (G's conditioning on this 2-layer model, generous)."""
    cfg = tiny(["model.tie_embeddings=true"] if tied else [])
    gen = torch.Generator().manual_seed(0)
    B, T, V = 2, 48, cfg.model.vocab_size
    x = torch.randint(0, V, (B, T), generator=gen)
    y = torch.randint(0, V, (B, T), generator=gen)
    y[:, :5] = IGNORE_INDEX
    budget = B * T * 1024  # 4 chunks of 1024 columns
    assert vocab_chunk(B * T, V) == V and vocab_chunk(B * T, V) != 1024  # default budget: the plain path
    ref_loss, ref = grads_of(cfg, x, y, 1 << 40, monkeypatch)
    got_loss, got = grads_of(cfg, x, y, budget, monkeypatch)
    assert loss_mod.vocab_chunk(B * T, V) == 1024
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert ("lm_head.weight" in ref) != tied  # tied: one tensor, both gradients summed into it
    # the head's own bounds, from the final hidden states of the same weights
    model = build_model(cfg.model, cfg.quant, "cpu", seed=3)
    with torch.no_grad():
        hidden = model.model(input_ids=x).last_hidden_state.flatten(0, 1)
    b_loss, b_h, b_w = head_bounds(hidden, model.lm_head.weight, y.flatten())
    assert abs(got_loss - ref_loss) <= b_loss
    if not tied:
        assert ((got[head] - ref[head]).abs().double() <= b_w).all()
    hidden = hidden.requires_grad_()
    dh, = torch.autograd.grad(F.cross_entropy(model.lm_head(hidden), y.flatten()), (hidden,))
    rel_h = b_h.norm().item() / dh.norm().item()  # normwise relative bound of Δ(dL/dh)
    assert 0 < rel_h < 1e-2  # worst case; a wrong gradient is off by O(1)
    for name in ref:
        diff, scale = (got[name] - ref[name]).norm().item(), ref[name].norm().item()
        bound = 16 * rel_h * scale + (b_w.norm().item() if name == head else 0)
        assert diff <= bound, f"{name}: |Δ| {diff:.3g} > {bound:.3g} (|grad| {scale:.3g})"


def test_default_tiny_recipe_takes_the_plain_path():
    """The shipped tiny recipe's 8 x 128 x 2048 logits fit one chunk: its training is bit-identical to the
    unchunked loss (the default run's losses are unchanged)."""
    cfg = TrainConfig.from_toml(RECIPES / "tiny.toml")
    t, V = cfg.train, cfg.model.vocab_size
    assert vocab_chunk(t.batch_size * t.seq_len, V) == V


def largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation while fn() runs (the profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.nbytes() for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type().name == "CPU")


@pytest.mark.parametrize("tied", [False, True])
def test_no_full_size_fp32_logits_ever_exist(tied, monkeypatch):
    """N = 256 tokens > hidden 64, so the N x V fp32 logits (and their gradient) are the largest tensors the
    plain path allocates, 4x lm_head's weight; the chunked path's largest allocation stays below them."""
    cfg = tiny(["model.tie_embeddings=true"] if tied else [])
    B, T, V = 4, 64, cfg.model.vocab_size
    x = torch.randint(0, V, (B, T))
    logits_bytes = B * T * V * torch.float32.itemsize
    for budget, plain in ((1 << 40, True), (B * T * 512, False)):
        monkeypatch.setattr(loss_mod, "LOSS_CHUNK_ELEMS", budget)
        model = build_model(cfg.model, cfg.quant, "cpu")
        model.train()
        biggest = largest_allocation(lambda: lm_loss(model, x, x, torch.float32).backward())
        if plain:
            assert biggest >= logits_bytes  # the probe sees them where they exist
        else:
            assert biggest <= max(B * T * 512, V * cfg.model.hidden_size) * 4 < logits_bytes


def test_chunked_step_memory_is_below_the_plain_one(monkeypatch):
    cfg = tiny()
    B, T, V = 4, 64, cfg.model.vocab_size
    x = torch.randint(0, V, (B, T))
    peaks = {}
    for budget in (1 << 40, B * T * 512):
        monkeypatch.setattr(loss_mod, "LOSS_CHUNK_ELEMS", budget)
        model = build_model(cfg.model, cfg.quant, "cpu")
        model.train()
        peaks[budget], _ = cpu_peak_bytes(lambda: lm_loss(model, x, x, torch.float32).backward())
    # plain: logits, log-softmax and its gradient (3 x N·V·4 = 12 MiB) at once; chunked: one chunk's few
    assert peaks[B * T * 512] < peaks[1 << 40] - 2 * B * T * V * 4


@pytest.mark.parametrize("tied", [False, True])
def test_a_chunked_release_step_reads_nothing_on_the_host(tied, monkeypatch):
    """Capturable: every tensor-to-host conversion raises during a release step whose loss runs in 8 chunks (the
    CPU stand-in for "no device sync", as tests/test_step_host_reads.py); the lm_head weight is still updated."""
    from qtrain.update.build import build_updater
    from qtrain.update.release import attach_release

    cfg = tiny(["model.tie_embeddings=true"] if tied else [])
    B, T = 2, 32
    monkeypatch.setattr(loss_mod, "LOSS_CHUNK_ELEMS", B * T * 512)
    model = build_model(cfg.model, cfg.quant, "cpu")
    updater = build_updater(model, cfg)
    attach_release(updater)
    x = torch.randint(0, cfg.model.vocab_size, (B, T))
    head = model.lm_head.weight.clone()

    real_item = torch.Tensor.item

    def host_read(*args, **_kwargs):
        caller = sys._getframe(1)
        if caller.f_code.co_name == "_get_value" and "torch/optim" in caller.f_code.co_filename:
            return real_item(*args)  # torch's AdamW step counter: a CPU tensor even on CUDA (capturable=False)
        raise AssertionError("the chunked loss read a tensor value on the host (a device sync on CUDA)")

    updater.begin_step(0.01)  # AdamW's lazy state (a host step counter) exists after a first step
    lm_loss(model, x, x, torch.float32).backward()
    updater.finish_step()
    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            m.setattr(torch.Tensor, attr, host_read)
        updater.begin_step(0.01)
        loss = lm_loss(model, x, x, torch.float32)
        loss.backward()
    updater.finish_step()
    assert not torch.equal(model.lm_head.weight, head)
