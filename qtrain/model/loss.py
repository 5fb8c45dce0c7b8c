"""The training loss: mean next-token cross-entropy over the targets that are not ignored (-100).

Small logits (B·T·V at most LOSS_CHUNK_ELEMS) take the plain path: lm_head's logits in the compute dtype, their
fp32 upcast, F.cross_entropy. Larger ones never exist whole: `linear_cross_entropy` fuses lm_head and the
cross-entropy over chunks of the vocabulary (`vocab_chunk` columns each). Its forward keeps an online logsumexp
and the target logit per token; its backward recomputes each chunk's logits and turns them into that chunk's
gradient (softmax - one-hot), then into dX (accumulated in fp32) and dW's rows of the chunk (final: no
accumulation). No full-size fp32 logits, log-softmax or logits gradient is ever alive. Cost: lm_head's forward
matmul runs twice (three times with the deferred dW below).

lm_head's weight gradient (V x d, as large as the weight) is computed last in backward, by a node made before the
model's forward (`_DeferredWeightGrad`): by then every block's saved tensors are freed, so it never coexists with
the activations. It arrives once, whole: its release hook updates lm_head once, as with the plain path, and a
tied embedding's two gradients add up before their one hook. Under FSDP2 (lm_head's weight gathered only inside
its own call) the loss's backward computes dW itself.

Chunking by vocabulary, not by tokens, so that dW needs no fp32 accumulator (V x d: 2 GiB for Llama-3-8B).
Plain torch on CPU and CUDA, capturable (no host sync, no data-dependent shape). The estimator reads the same
`vocab_chunk` rule (qtrain.estimate).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100  # F.cross_entropy's default: prompt tokens, padding (qtrain.data.finetune)
# Elements of one chunk's logits (N x Vc): 4 Mi = 16 MiB in fp32. Below it the logits are small enough to take
# whole (the plain path, bit-identical to what qtrain did before chunking): the tiny recipe's 1024 x 2048 are.
# 7b's 256 x 32000 are 2 chunks, Llama-3-8B's 2048 x 128,256 are 63 of 2048 columns.
LOSS_CHUNK_ELEMS = 1 << 22
MIN_CHUNK_COLS = 256  # very many tokens: a narrower chunk would only add launches


def vocab_chunk(tokens: int, vocab: int) -> int:
    """Columns of one vocabulary chunk for `tokens` targets: the whole vocabulary while tokens·vocab fits
    LOSS_CHUNK_ELEMS (one chunk: the plain path), else as many as fit (at least MIN_CHUNK_COLS)."""
    if tokens * vocab <= LOSS_CHUNK_ELEMS:
        return vocab
    return min(vocab, max(MIN_CHUNK_COLS, LOSS_CHUNK_ELEMS // tokens))


def _chunk_logits(hc: Tensor, weight: Tensor, v0: int, v1: int, compute: torch.dtype) -> tuple[Tensor, Tensor]:
    """(fp32 logits of columns v0:v1, the compute-dtype weight rows): hc (N, C) in compute -> (N, Vc)."""
    w = weight[v0:v1].to(compute)  # (Vc, C): a copy unless the weight is stored in the compute dtype
    return (hc @ w.T).float(), w  # fp32 upcast as the plain path's logits.float()


def _targets_in(y: Tensor, v0: int, v1: int) -> tuple[Tensor, Tensor]:
    """(column of each target inside v0:v1, clamped to it, (N, 1); whether the target is in it, (N,))."""
    idx = y - v0
    inside = (idx >= 0) & (idx < v1 - v0)
    return idx.clamp(0, v1 - v0 - 1).unsqueeze(1), inside


def _chunk_forward(hc: Tensor, weight: Tensor, y: Tensor, v0: int, v1: int, compute: torch.dtype
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(row max, sum of exp(z - max), target logit or 0) of the chunk's logits z, (N,) each; the (N, Vc) tensors
    die on return, so one chunk's are alive at a time."""
    z, _ = _chunk_logits(hc, weight, v0, v1, compute)
    idx, inside = _targets_in(y, v0, v1)
    target = torch.where(inside, z.gather(1, idx).squeeze(1), 0.0)
    top = z.amax(1)
    return top, z.sub_(top.unsqueeze(1)).exp_().sum(1), target


def _chunk_grad(hc: Tensor, weight: Tensor, y: Tensor, lse: Tensor, scale: Tensor, v0: int, v1: int,
                compute: torch.dtype) -> tuple[Tensor, Tensor]:
    """(d loss / d z of the chunk in compute (N, Vc), the chunk's weight rows in compute (Vc, C)): the logits
    recomputed, softmax - one-hot, times each token's scale; the fp32 tensor dies on return."""
    z, w = _chunk_logits(hc, weight, v0, v1, compute)
    p = z.sub_(lse.unsqueeze(1)).exp_()  # softmax of the chunk's columns, in place
    idx, inside = _targets_in(y, v0, v1)
    p.scatter_add_(1, idx, -inside.to(p.dtype).unsqueeze(1))  # - one-hot of the targets in the chunk
    return p.mul_(scale).to(compute), w  # as the plain path's logits gradient, in compute


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over non-ignored n of (logsumexp_v z[n, v] - z[n, y_n]), z = h @ Wᵀ in the compute dtype."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, y: Tensor, compute: torch.dtype, width: int,
                deferred: Deferred | None) -> Tensor:
        # h (N, C) residual dtype; weight (V, C) float dtype; y (N,) int64
        with torch.autocast(h.device.type, enabled=False):  # explicit casts below, as autocast would make
            hc = h.to(compute)  # (N, C): what the plain path's lm_head saves
            N, V = h.shape[0], weight.shape[0]
            top = torch.full((N,), -torch.inf, device=h.device)  # running max of each row
            total = torch.zeros(N, device=h.device)  # running sum of exp(z - top)
            target = torch.zeros(N, device=h.device)  # z[n, y_n]
            for v0 in range(0, V, width):  # an online logsumexp over the chunks
                chunk_top, chunk_sum, chunk_target = _chunk_forward(hc, weight, y, v0, min(V, v0 + width), compute)
                new_top = torch.maximum(top, chunk_top)
                total = total * torch.exp(top - new_top) + chunk_sum * torch.exp(chunk_top - new_top)
                target += chunk_target
                top = new_top
            lse = top + total.log()  # (N,)
            valid = y != IGNORE_INDEX
            loss = torch.where(valid, lse - target, 0.0).sum() / valid.sum()
        ctx.save_for_backward(hc, weight, y, lse)
        ctx.compute, ctx.width, ctx.h_dtype = compute, width, h.dtype
        if deferred is not None:  # _DeferredWeightGrad computes dW from these, after every block's backward
            deferred.saved = (hc, y, lse, compute, width)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        hc, weight, y, lse = ctx.saved_tensors
        compute, width = ctx.compute, ctx.width
        grad_h = torch.zeros(hc.shape, device=hc.device) if ctx.needs_input_grad[0] else None  # fp32 sum
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        _chunked_grads(hc, weight, y, lse, grad_loss, compute, width, grad_h, grad_w)
        return (None if grad_h is None else grad_h.to(ctx.h_dtype)), grad_w, None, None, None, None


def _chunked_grads(hc: Tensor, weight: Tensor, y: Tensor, lse: Tensor, grad_loss: Tensor, compute: torch.dtype,
                   width: int, grad_h: Tensor | None, grad_w: Tensor | None) -> None:
    """Fill grad_w (V, C) and add dX into grad_h (N, C, fp32), whichever is given, chunk by chunk."""
    valid = y != IGNORE_INDEX
    scale = torch.where(valid, grad_loss / valid.sum(), 0.0).unsqueeze(1)  # (N, 1): d loss / d nll_n
    V = weight.shape[0]
    for v0 in range(0, V, width):
        v1 = min(V, v0 + width)
        g, w = _chunk_grad(hc, weight, y, lse, scale, v0, v1, compute)  # (N, Vc), (Vc, C)
        if grad_w is not None:  # dW[v0:v1] = gᵀ hc is final: each row of W meets every token here
            if grad_w.dtype == compute:
                torch.mm(g.T, hc, out=grad_w[v0:v1])
            else:
                grad_w[v0:v1] = g.T @ hc
        if grad_h is not None:
            grad_h += g @ w  # (N, C)
        del g, w  # before the next chunk's are made: one chunk's alive at a time


class Deferred:
    """What the loss forward leaves for lm_head's deferred weight gradient: (hc, y, lse, compute, width)."""

    saved: tuple | None = None


class _DeferredWeightGrad(torch.autograd.Function):
    """lm_head's weight gradient, computed after the rest of backward.

    Its node is created before the model's forward, so it is the oldest of the graph; autograd's ready queue runs
    the newest ready node first (sequence numbers), so dW is computed once every block's backward has run and
    their saved tensors (checkpointed inputs included) are freed. Its output, a 0-dim zero, is added to the loss:
    it receives the loss's gradient at once, and waits.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, deferred: Deferred) -> Tensor:
        ctx.deferred = deferred
        ctx.save_for_backward(weight)
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (weight,) = ctx.saved_tensors
        hc, y, lse, compute, width = ctx.deferred.saved
        ctx.deferred.saved = None
        grad_w = torch.empty_like(weight)
        _chunked_grads(hc, weight, y, lse, grad_loss.float(), compute, width, None, grad_w)
        return grad_w, None


def linear_cross_entropy(h: Tensor, weight: Tensor, y: Tensor, compute: torch.dtype, width: int | None = None,
                         deferred: Deferred | None = None) -> Tensor:
    """Mean cross-entropy of the logits h @ weightᵀ (computed in `compute`) against y, ignoring -100, in chunks of
    `width` vocabulary columns (default `vocab_chunk`). h (N, C), weight (V, C), y (N,) int64; fp32 result.
    deferred: the weight's gradient is left to a `_DeferredWeightGrad` node (pass the weight detached)."""
    return _LinearCrossEntropy.apply(h, weight, y, compute, width or vocab_chunk(y.numel(), weight.shape[0]),
                                     deferred)


class _LossCall(NamedTuple):
    targets: Tensor
    deferred: Deferred | None


class LMHead(nn.Linear):
    """transformers' lm_head (an nn.Linear, same parameters and state_dict) that can return the loss.

    Inside `loss_of(y)` a call returns `linear_cross_entropy` of its input against y instead of the logits.
    The loss is computed inside the model's own forward, in lm_head's call, so that wrappers which act on module
    calls still see one: FSDP2 gathers lm_head's weight in its pre-forward hook (qtrain.parallel.fsdp), and the
    root module's forward (FSDP2's lazy init and final callbacks) runs as ever.
    """

    call: _LossCall | None = None

    @contextmanager
    def loss_of(self, y: Tensor, deferred: Deferred | None = None):
        assert self.bias is None, "linear_cross_entropy has no bias term (no supported family has one)"
        self.call = _LossCall(y, deferred)
        try:
            yield
        finally:
            self.call = None

    def forward(self, h: Tensor) -> Tensor:
        if self.call is None:
            return super().forward(h)
        device = h.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        y, deferred = self.call
        weight = self.weight if deferred is None else self.weight.detach()  # dW: _DeferredWeightGrad's
        return linear_cross_entropy(h.flatten(0, -2), weight, y.flatten(), compute, deferred=deferred)


def _sharded(module: nn.Module) -> bool:
    """FSDP2 gathers this module's weight only inside its own call: its gradient cannot be deferred."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def lm_loss(model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """Mean next-token cross-entropy; logits in fp32 for the softmax, in vocabulary chunks when they are large.

    Chunked, lm_head's weight gradient is computed at the end of backward (_DeferredWeightGrad), after the blocks'
    saved tensors are freed; under FSDP2 in the loss's own backward."""
    head = model.lm_head
    chunked = isinstance(head, LMHead) and vocab_chunk(y.numel(), head.out_features) < head.out_features
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        if chunked:
            train = torch.is_grad_enabled() and head.weight.requires_grad
            deferred = Deferred() if train and not _sharded(head) else None
            anchor = None if deferred is None else _DeferredWeightGrad.apply(head.weight, deferred)  # the oldest node
            with head.loss_of(y, deferred):
                loss = model(input_ids=x, use_cache=False).logits  # lm_head returned the loss
            return loss if anchor is None else loss + anchor
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def lm_loss_per_row(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of targets) of each row (B,), B = x.shape[0]: what lm_loss averages.

    A row's numbers do not depend on the other rows in the batch (causal attention, no padding mask), so
    rows can be regrouped into larger batches and the batch means of lm_loss rebuilt from them.
    """
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    token = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (B*T,), 0 where ignored
    return token.view(y.shape).sum(1), (y != -100).sum(1)
