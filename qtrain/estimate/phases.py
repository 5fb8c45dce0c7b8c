"""A step as a sequence of phases, each the non-persistent bytes alive at one moment.

Forward (last block), the loss (forward and backward; the plain path or the chunked one), lm_head's backward and
update, the block backward at its worst projection, the embedding's update, and without release the updates
after backward. The predicted peak is the persistent bytes plus the largest phase (qtrain.estimate.memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qtrain.config.recipe import TrainConfig
from qtrain.estimate.activations import F32, Activations, activation_bytes
from qtrain.estimate.breakdown import Timeline
from qtrain.estimate.transients import chunked_loss_bytes, float_update_bytes_of, int8_update_bytes
from qtrain.model.builder import META_DTYPES, is_quantized_projection
from qtrain.quant import dispatch
from qtrain.quant.dispatch import KernelPlan
from qtrain.quant.linear import Int8Linear
from qtrain.update.updater import Updater

ACT, TR = "activation", "transient"


@dataclass
class Step:
    """One training step of a recipe: its shapes, dtypes and choices, and the timeline its phases fill."""

    cfg: TrainConfig
    updater: Updater
    device_type: str
    compute: torch.dtype  # c: the autocast dtype, or the float tensors' without autocast
    sharded: bool = False  # FSDP2: the chunked loss computes lm_head's dW in its own backward (no deferral)
    tl: Timeline = field(default_factory=Timeline)

    def __post_init__(self):
        m, t = self.cfg.model, self.cfg.train
        self.F = META_DTYPES[m.float_dtype]
        self.R = torch.promote_types(self.F, self.compute)  # the residual stream's dtype
        self.s = self.compute.itemsize
        self.B, self.T, self.d, self.V, self.L = t.batch_size, t.seq_len, m.hidden_size, m.vocab_size, m.num_layers
        self.N = self.B * self.T
        self.release, self.ckpt = t.release, t.activation_checkpointing
        self.act: Activations = activation_bytes(
            B=self.B, T=self.T, d=self.d, ff=m.intermediate_size, h=m.num_heads, kv=m.kv_heads, V=self.V,
            attn=m.attn_implementation, compute=self.compute, float_dtype=self.F, quantized=self.cfg.quant.enabled,
            head_dim=m.head_dim, qk_norm=m.family == "qwen3")
        # Int8Linear.receive_grad: one micro-batch leaves dW in the compute dtype; accumulation sums in fp32
        self.held_int8_bytes = F32 if t.grad_accum_steps > 1 else self.s
        # The projections of one block (all blocks are alike), in backward order (reverse forward order)
        self.block_layers = [l for n, l in self.updater.int8.items() if ".layers.0." in n][::-1]
        self.block_floats = [n for n in self.updater.floats if ".layers.0." in n
                             and is_quantized_projection(n.removesuffix(".weight"))][::-1]
        self.loss = chunked_loss_bytes(self.N, self.V, self.d, self.compute, self.F, self.R)
        # the chunked loss defers lm_head's dW to the end of backward (qtrain.model.loss._DeferredWeightGrad)
        self.deferred = self.loss is not None and not self.sharded and self.lm_head_name() is not None

    def plan(self, layer: Int8Linear) -> KernelPlan:
        """The int8 kernel dispatch's choices for this layer in this step."""
        q = self.cfg.quant
        return dispatch.plan(q.kernels, q.matmul, self.device_type, layer.codes, layer.scale, layer.offset,
                             layer.group_size, self.N, self.compute)

    # ---- the parts every phase shares -----------------------------------------------------------------
    @property
    def blocks(self) -> tuple[str, int]:
        """(name, bytes) of the blocks' saved activations (checkpointing: their inputs)."""
        a, L = self.act, self.L
        if self.ckpt:
            return self.tl.part(f"checkpointed block inputs ({L} blocks, {self.B} x {self.T})", ACT,
                                "activation_bytes: non-reentrant checkpoint keeps each block's input"), L * a.block_input
        return self.tl.part(f"saved activations ({L} blocks, {self.cfg.model.attn_implementation}, {self.B} x "
                            f"{self.T})", ACT, "activation_bytes: LlamaDecoderLayer + Int8Linear saved tensors"), \
            L * a.block

    @property
    def const(self) -> str:
        return self.tl.part("RoPE tables and token ids", ACT, "LlamaRotaryEmbedding cos/sin, batch x and y")

    @property
    def mask(self) -> str:
        return self.tl.part("causal mask (eager)", ACT, "transformers create_causal_mask for eager attention")

    def base(self) -> dict[str, int]:
        """Alive from the end of the forward to the head's backward: blocks, constants (and the checkpoints' mask)."""
        blocks, nbytes = self.blocks
        return {blocks: nbytes, self.const: self.act.constant, **({self.mask: self.act.causal_mask} if self.ckpt else {})}

    def final_norm(self) -> dict[str, int]:
        return {self.tl.part("final norm saved", ACT, "activation_bytes: final LlamaRMSNorm"): self.act.final_norm}

    def head(self) -> dict[str, int]:
        """The final norm's and lm_head's saved tensors (the plain path's lm_head also caches a c weight copy)."""
        copy = self.act.lm_head_weight_copy if self.loss is None else 0
        lm_in = self.tl.part("lm_head saved input" + (" + autocast weight copy" if copy else ""), ACT,
                             "activation_bytes: lm_head's input under autocast")
        return {**self.final_norm(), lm_in: self.act.lm_head_input + copy}

    def kept_for_dw(self) -> dict[str, int]:
        """Deferred dW: lm_head's c input and lse, kept from the loss's backward to the dW pass at the end."""
        if not self.deferred:
            return {}
        return {self.tl.part("kept for lm_head's deferred dW (its input, lse)", ACT,
                             "qtrain.model.loss.Deferred: hc and lse until _DeferredWeightGrad"):
                self.act.lm_head_input + self.loss.saved}

    def lm_head_name(self) -> str | None:
        return next((n for n in self.updater.floats if n.startswith("lm_head")), None)

    def float_update(self, name: str) -> int:
        return float_update_bytes_of(name, self.updater, self.device_type)

    def int8_update(self, layer: Int8Linear) -> int:
        return int8_update_bytes(layer, self.updater.matrix_method, self.plan(layer), self.compute,
                                 self.cfg.quant.rounding)


def forward_phase(st: Step) -> None:
    """The last block's forward: at down_proj's dequantize (the MLP weights are the largest) everything saved so
    far is alive; eager attention peaks earlier, at softmax, with the masked scores beside the block's first half.
    A checkpointed block saves nothing in forward: its input, the norm and the MLP product."""
    a, tl = st.act, st.tl
    fwd = max((st.plan(l).dequantize_bytes(tuple(l.codes.shape), st.compute) for l in st.block_layers), default=0)
    deq = tl.part("dequantized weight / attention scores (forward)", TR, "KernelPlan.dequantize_bytes; eager softmax")
    if st.ckpt:
        tl.add("forward (last block)", {**st.base(), tl.part(
            "checkpointed block's forward (norm out, MLP product)", TR, "LlamaDecoderLayer.forward under checkpoint"):
            a.norm + a.mlp_unit, deq: max(fwd, 2 * a.attn_scores)})
        return
    blocks, nbytes = st.blocks
    at_softmax = a.alive_at("o_proj") - a.block + a.attn_scores  # relative to all blocks saved
    tl.add("forward (last block)", {blocks: nbytes, st.const: a.constant, st.mask: a.causal_mask,
                                    deq: max(fwd, at_softmax)})


def plain_loss_phases(st: Step) -> None:
    """lm_loss's plain path (the logits fit one chunk): lm_head's logits (c) and their fp32 upcast while
    log_softmax runs; in backward nll_loss_backward's dense fp32 gradient and _log_softmax_backward_data's output;
    then lm_head's backward: dlogits (c) -> dX (sNd) and dW (c), autocast's cast of dW to F (both alive),
    AccumulateGrad, then the release hook updates lm_head while dX waits for the final norm."""
    a, tl, N, V, s = st.act, st.tl, st.N, st.V, st.s
    base, head = st.base(), st.head()
    lsm = tl.part("log-softmax output (fp32)", ACT, "lm_loss -> F.cross_entropy saves log_softmax")
    logits = tl.part("logits and loss (fp32 upcast in lm_loss)", TR,
                     "lm_loss: logits, logits.float(), log_softmax and its backward")
    tl.add("loss forward", {**base, **head, lsm: a.log_softmax,
                            logits: a.logits + (F32 * N * V if st.compute != torch.float32 else 0)})
    tl.add("loss backward", {**base, **head, lsm: a.log_softmax, logits: 2 * F32 * N * V})
    lm = st.lm_head_name()
    if lm is None:
        return
    numel = st.updater.floats[lm].numel()
    dW_c, grad = s * numel, st.F.itemsize * numel
    mm = a.logits + s * N * st.d + dW_c + a.lm_head_input + a.lm_head_weight_copy
    cast = s * N * st.d + dW_c + grad if st.F != st.compute else 0
    hook = s * N * st.d + grad + (st.float_update(lm) if st.release else 0)
    tl.add("lm_head backward" + (" + update" if st.release else ""), {
        **base, **st.final_norm(),
        tl.part("lm_head gradient" + (" + update" if st.release else ""), TR,
                "lm_head backward; Updater.update_float (float_update_bytes_of)"): max(mm, cast, hook)})


def chunked_loss_phases(st: Step) -> None:
    """lm_loss's chunked path (qtrain.model.loss.linear_cross_entropy; transients.ChunkedLoss): its forward and its
    backward (dX; under FSDP2 lm_head's dW too, then AccumulateGrad and the release hook's update of lm_head while
    dX (R) waits for the final norm). The deferred dW is `deferred_weight_grad_phase`, at the end of backward."""
    tl, loss = st.tl, st.loss
    base, head = st.base(), st.head()
    lse = tl.part("chunked loss: logsumexp per token (fp32)", ACT, "linear_cross_entropy saves lse")
    chunk = tl.part(f"chunked loss ({st.V} columns in chunks: one chunk's logits, dX{'' if st.deferred else ', dW'})",
                    TR, "qtrain.model.loss.linear_cross_entropy, forward and backward (transients.ChunkedLoss)")
    tl.add("loss forward (chunked)", {**base, **head, lse: loss.saved, chunk: loss.forward})
    if st.deferred:
        tl.add("loss backward (chunked, dX)", {**base, **head, lse: loss.saved, chunk: loss.dx})
        return
    tl.add("loss backward (chunked, dX and lm_head dW)", {**base, **head, lse: loss.saved, chunk: loss.both})
    lm = st.lm_head_name()
    if lm is None:
        return
    dx = st.R.itemsize * st.N * st.d
    tl.add("lm_head gradient" + (" + update" if st.release else ""), {
        **base, **st.final_norm(),
        tl.part("lm_head gradient" + (" + update" if st.release else ""), TR,
                "AccumulateGrad; Updater.update_float (float_update_bytes_of)"):
            dx + loss.weight_grad + (st.float_update(lm) if st.release else 0)})


def deferred_weight_grad_phase(st: Step) -> None:
    """The chunked loss's deferred dW (qtrain.model.loss._DeferredWeightGrad), the last node of backward: the
    chunks again beside dW, then AccumulateGrad and, with release, lm_head's update. Without release every other
    gradient is held meanwhile."""
    if not st.deferred:
        return
    u, loss, tl = st.updater, st.loss, st.tl
    lm = st.lm_head_name()
    held = 0 if st.release else (sum(l.codes.numel() * st.held_int8_bytes for l in u.int8.values())
                                 + sum(p.numel() * p.element_size() for n, p in u.floats.items() if n != lm))
    update = st.float_update(lm) if st.release else 0
    tl.add("lm_head dW (deferred)" + (" + update" if st.release else ""), {
        st.const: st.act.constant, **st.kept_for_dw(),
        tl.part("gradients held (release = false)", TR, "Int8Linear.weight_grad and .grad, kept to the step"): held,
        tl.part("lm_head dW (deferred, chunked)" + (" + update" if st.release else ""), TR,
                "_DeferredWeightGrad.backward; AccumulateGrad; Updater.update_float (float_update_bytes_of)"):
            loss.weight_grad + max(loss.dw, update)})


def weight_backward(st: Step, name: str) -> tuple[int, int]:
    """(peak bytes beyond the activations while this projection back-propagates, the gradient it leaves).

    int8 layers dequantize again in backward, then dW and, with release, its update inside the hook; float
    projections (quant.enabled = false) get dW in c, autocast's cast to F, update_float."""
    s, N = st.s, st.N
    if name in st.updater.int8:
        layer = st.updater.int8[name]
        shape = tuple(layer.codes.shape)
        mn, dx = shape[0] * shape[1], s * N * shape[1]
        during = max(st.plan(layer).dequantize_bytes(shape, st.compute), s * mn + dx)
        upd = st.int8_update(layer) if st.release else 0
        return max(during, dx + s * mn + upd), st.held_int8_bytes * mn
    p = st.updater.floats[name]
    grad, dx = p.numel() * p.element_size(), s * N * p.shape[1]
    cast = s * p.numel() + grad if p.dtype != st.compute else grad
    return dx + max(cast, grad + (st.float_update(name) if st.release else 0)), grad


def block_backward_phase(st: Step) -> None:
    """Block backward, from the last block down. With release every gradient is freed in its hook, so the last
    block (all activations still alive) is the worst; without release the gradients pile up while the
    activations are freed, so every block is a candidate."""
    a, tl, u, N, d = st.act, st.tl, st.updater, st.N, st.d
    weights = [l.name for l in st.block_layers] + st.block_floats
    grads_in_flight = st.R.itemsize * N * d + (st.s * N * d if st.R != st.compute else 0)
    lm = st.lm_head_name() if st.deferred else None  # a deferred dW arrives after the blocks
    head_grads = sum(p.numel() * p.element_size() for n, p in u.floats.items()
                     if ".layers." not in n and not n.endswith("embed_tokens.weight") and n != lm)
    block_grads = sum(p.numel() * p.element_size() for n, p in u.floats.items() if ".layers.0." in n
                      and n not in st.block_floats) + sum(weight_backward(st, n)[1] for n in weights)
    kept = a.block_input if st.ckpt else 0
    best = (0, "none", st.L - 1, 0, 0, 0)  # (phase bytes, projection, block, activations, held gradients, peak)
    for block in reversed(range(st.L)):
        before = block * (a.block_input if st.ckpt else a.block)  # blocks not reached yet
        held = 0 if st.release else head_grads + (st.L - 1 - block) * block_grads
        for name in weights:
            projection = name.removesuffix(".weight").rsplit(".", 1)[-1]
            acts = before + kept + a.alive_at(projection, recomputed=st.ckpt)
            peak, grad = weight_backward(st, name)
            if acts + held + peak > best[0]:
                best = (acts + held + peak, projection, block, acts, held, peak)
            held += 0 if st.release else grad
            if projection == "down_proj":  # then silu(gate) * up's backward: dX and two (B, T, ff) gradients
                acts = before + kept + a.alive_at("down_proj", recomputed=st.ckpt) - a.mlp_unit  # product freed
                if acts + held + 3 * a.mlp_unit > best[0]:
                    best = (acts + held + 3 * a.mlp_unit, "silu(gate) * up", block, acts, held, 3 * a.mlp_unit)
        if st.release:
            break
    _, bwd_name, bwd_block, acts, held, bwd = best
    tl.add(f"block backward (block {bwd_block}, {bwd_name})", {
        tl.part(f"activations alive in backward (blocks 0-{bwd_block}{', checkpointed' if st.ckpt else ''})", ACT,
                "activation_bytes + Activations.alive_at: saved tensors not yet consumed"): acts,
        st.const: a.constant, **st.kept_for_dw(),
        **({st.mask: a.causal_mask} if st.ckpt else {}),
        tl.part("gradients held (release = false)", TR, "Int8Linear.weight_grad and .grad, kept to the step"): held,
        tl.part("activation gradients in flight", TR, "residual-stream gradient (+ its compute-dtype copy)"):
            grads_in_flight,
        tl.part(f"projection backward ({bwd_name}: dequantized weight, dX, dW{' + update' if st.release else ''})",
                TR, "_Int8LinearFn.backward; Updater.update_int8 (int8_update_bytes)"): bwd,
    })


def embedding_phase(st: Step) -> None:
    """Release: the embedding's gradient and its update, the last of the step."""
    emb = next((n for n in st.updater.floats if n.endswith("embed_tokens.weight")), None)
    if not st.release or emb is None:
        return
    p = st.updater.floats[emb]
    st.tl.add("embedding backward + update", {
        st.const: st.act.constant, **st.kept_for_dw(),
        st.tl.part("embedding gradient + update", TR, "embedding backward; Updater.update_float (float_update_bytes_of)"):
            p.numel() * p.element_size() + st.float_update(emb)})


def finish_step_phase(st: Step) -> None:
    """release = false: Updater.finish_step. Every gradient is alive after backward and is freed after its own
    update, in finish_step's order: int8 layers, then float tensors."""
    if st.release:
        return
    u = st.updater
    grads = {n: l.codes.numel() * st.held_int8_bytes for n, l in u.int8.items()}
    grads.update({n: p.numel() * p.element_size() for n, p in u.floats.items()})
    updates = [(n, st.int8_update(l)) for n, l in u.int8.items()] + [(n, st.float_update(n)) for n in u.floats]
    total = live = peak = sum(grads.values())
    at = ""
    for name, upd in updates:
        if live + upd > peak:
            peak, at = live + upd, name
        live -= grads[name]
    st.tl.add("updates after backward (release = false)", {
        st.const: st.act.constant,
        st.tl.part("all gradients (release = false)", TR, "Int8Linear.weight_grad and .grad of every float tensor"):
            total,
        st.tl.part(f"update transient ({at})", TR, "Updater.finish_step -> update_int8 / update_float"): peak - total,
    })


def phases(cfg: TrainConfig, updater: Updater, device_type: str, compute: torch.dtype, sharded: bool = False
           ) -> Step:
    """Every phase of one step, in order, on the returned Step's timeline."""
    st = Step(cfg, updater, device_type, compute, sharded)
    forward_phase(st)
    (plain_loss_phases if st.loss is None else chunked_loss_phases)(st)
    block_backward_phase(st)
    embedding_phase(st)
    deferred_weight_grad_phase(st)
    finish_step_phase(st)
    return st
