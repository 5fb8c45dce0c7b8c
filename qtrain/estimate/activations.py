"""Bytes autograd saves for backward in one micro-batch: the one formula of the estimator (`activation_bytes`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

F32 = torch.float32.itemsize


@dataclass
class Activations:
    """Bytes saved for backward (and the head's transients) of one micro-batch of B x T tokens."""

    norm: int  # one LlamaRMSNorm's saved tensors (a block has two, the head one)
    qkv_inputs: int  # what q/k/v_proj save of their input
    attention: int  # attention's saved tensors (sdpa or eager), o_proj's input included
    mlp_inputs: int  # what gate/up_proj save of their input
    mlp_unit: int  # one (B, T, ff) tensor in the compute dtype; the MLP saves four
    block_input: int  # the block's input hidden state: all a checkpointed block keeps
    x32_is_input: bool  # the norms' fp32 input is the block input itself (residual stream in fp32)
    lm_head_input: int  # lm_head's saved input in the compute dtype
    lm_head_weight_copy: int  # autocast's cached compute-dtype copy of a float lm_head weight
    log_softmax: int  # log-softmax output (fp32) saved by cross_entropy
    logits: int  # logits in the compute dtype (B, T, V): a transient
    constant: int  # RoPE cos/sin tables, the token ids x, y and nll_loss's total_weight
    attn_scores: int  # eager only: the masked (B, h, T, T) scores in the residual dtype, a forward transient
    causal_mask: int  # eager only: the (B, 1, T, T) mask in F, alive through the forward (and with
    # checkpointing until the last block's backward: the checkpoints keep their arguments)
    weight_copies: int = 0  # quant.enabled = false: autocast's c copies of a block's F projection weights
    q_norm: int = 0  # Qwen3: the q RMSNorm's saved tensors (per head), freed before k_proj's backward
    k_norm: int = 0  # Qwen3: the k RMSNorm's, freed before q_norm's backward

    @property
    def block(self) -> int:
        """Everything autograd keeps from one decoder block's forward."""
        return (2 * self.norm + self.qkv_inputs + self.attention + self.mlp_inputs + 4 * self.mlp_unit
                + self.weight_copies + self.q_norm + self.k_norm)

    @property
    def recomputed_block(self) -> int:
        """What the recompute of a checkpointed block allocates again (its input is kept already)."""
        return self.block - (self.block_input if self.x32_is_input else 0)

    @property
    def final_norm(self) -> int:
        return self.norm

    def alive_at(self, projection: str, recomputed: bool = False) -> int:
        """A block's saved bytes still alive when backward reaches `projection` (e.g. "up_proj").

        Backward frees each op's saved tensors once it ran: down_proj sees the whole block; up_proj (run
        before silu's backward) still sees gate's output; gate_proj the attention half plus norm2 and the
        MLP inputs; o_proj the attention half; v/k/q_proj only norm1 and their inputs.
        """
        first = self.norm - (self.block_input if recomputed and self.x32_is_input else 0)
        attention_half = first + self.qkv_inputs
        qk = self.q_norm + self.k_norm  # v_proj (created after them) back-propagates before the q/k norms
        mlp_half = attention_half + self.attention + qk + self.norm + self.mlp_inputs
        alive = {"down_proj": mlp_half + 4 * self.mlp_unit, "up_proj": mlp_half + self.mlp_unit,
                 "gate_proj": mlp_half, "o_proj": attention_half + self.attention + qk,
                 "v_proj": attention_half + qk, "k_proj": attention_half + self.q_norm}.get(projection, attention_half)
        return alive + self.weight_copies  # (float projections only; freed one by one, counted whole)


def activation_bytes(*, B: int, T: int, d: int, ff: int, h: int, kv: int, V: int, attn: str,
                     compute: torch.dtype, float_dtype: torch.dtype, quantized: bool = True, head_dim: int = 0,
                     qk_norm: bool = False) -> Activations:
    """Saved-tensor bytes of transformers' LlamaDecoderLayer with qtrain's Int8Linear, in train mode.

    Derivation (N = B·T tokens, hd = d/h; s, r, f = bytes per element of the compute dtype c, the
    residual dtype R and the float-parameter dtype F; tests/test_estimate.py checks it on CPU in fp32,
    bf16 autocast and bf16 parameters, sdpa and eager, with and without checkpointing):
    - dtypes. c is the autocast dtype, or F without autocast (Int8Linear computes in its input's dtype).
      The embedding outputs F and each branch outputs c, so the residual stream is R = promote(F, c).
      RoPE's cos/sin take the embedding's dtype, so q and k after RoPE are R as well.
    - LlamaRMSNorm(x): `x.to(fp32)` is saved by pow and mul (4Nd: x itself when R is fp32, else a copy),
      rsqrt(var) (4N), and the normalised x in R saved by `weight * x` (rNd). Its output y is R.
    - Int8Linear saves `x.to(c)`: y itself when R == c, else one c copy cast once for all the projections
      reading y (qtrain.quant.linear.shared_cast): q, k, v share one tensor, gate and up another. No weight is
      saved. nn.Linear (quant.enabled = false) under autocast casts per call: 3 copies in attention, 2 in the MLP.
    - sdpa: autocast casts q, k to c; the kernel saves q (sNd), k and v (s·N·kv·hd each: GQA runs with
      enable_gqa, no repeat_kv), out (sNd) and logsumexp (4·N·h). The flash/efficient kernels return out
      in (B, T, h, hd) layout, so `transpose(1, 2).contiguous()` is a no-op: o_proj saves that same tensor.
    - eager: q, k, v after repeat_kv (sNd each: the matmuls save their contiguous c inputs), softmax's fp32
      probabilities (4·B·h·T²) plus their c copy for the second matmul when c is not fp32 (s·B·h·T²), and
      o_proj's contiguous input (sNd). The masked scores (r·B·h·T²) live only during the forward, the
      causal mask (f·B·T², shared by the blocks) as long as the forward, or the checkpoints, hold it.
    - MLP: gate out (saved by silu), silu out and up out (saved by their product), the product (down_proj's
      input): 4·s·N·ff. Residual additions save nothing; RoPE multiplies by constants, saving only cos/sin.
    - Head: final norm as above; lm_head's input (sNd) and, under autocast, its cached c copy of an F
      weight (s·V·d when F != c); logits (s·N·V, transient); `lm_loss` upcasts them to fp32 and
      cross_entropy saves only the log-softmax output (4·N·V), the targets and a 0-dim total_weight.
    - quant.enabled = false: the projections are nn.Linear with F weights; under autocast each saves its
      cached c copy of the weight (s·d·(2d + 2·kv·hd + 3·ff) per block when F != c).
    - Checkpointing (non-reentrant): a block keeps only its input (rNd); its recompute in backward allocates
      the block's saved tensors again, except `x.to(fp32)` when R is fp32 (that is the kept input).
    - Checkpoints ([model] init): head_dim (Qwen3's own) makes the query width h·hd instead of d in the
      attention terms above; Qwen3's q/k RMSNorms save (4 + s)·N·width + 4·N·heads each (qk_norm); Qwen2's
      q/k/v biases are added to the c output (`y + b.to(c)`) and save nothing.
    """
    N, hd = B * T, head_dim or d // h
    q = h * hd  # query width: d, unless a checkpoint sets its own head_dim (Qwen3)
    s, f = compute.itemsize, float_dtype.itemsize
    R = torch.promote_types(float_dtype, compute)
    r = R.itemsize
    norm = F32 * N * d + F32 * N + r * N * d
    shared = R == compute or quantized
    qkv_inputs = s * N * d * (1 if shared else 3)
    mlp_inputs = s * N * d * (1 if shared else 2)
    if attn == "sdpa":
        attention = s * N * q + 2 * s * N * kv * hd + s * N * q + F32 * N * h
        scores = mask = 0
    else:
        probs = B * h * T * T
        attention = 3 * s * N * q + F32 * probs + (s * probs if compute != torch.float32 else 0) + s * N * q
        scores = r * probs
        mask = f * B * T * T
    return Activations(
        norm=norm,
        qkv_inputs=qkv_inputs,
        attention=attention,
        mlp_inputs=mlp_inputs,
        mlp_unit=s * N * ff,
        block_input=r * N * d,
        x32_is_input=R == torch.float32,
        lm_head_input=s * N * d,
        lm_head_weight_copy=s * V * d if float_dtype != compute else 0,
        log_softmax=F32 * N * V,
        logits=s * N * V,
        constant=2 * T * hd * f + 2 * N * torch.int64.itemsize + F32,
        attn_scores=scores,
        causal_mask=mask,
        weight_copies=0 if quantized or float_dtype == compute else s * d * (2 * q + 2 * kv * hd + 3 * ff),
        # Qwen3RMSNorm of each head's q (k): x.to(fp32) saved by pow and mul, rsqrt per head, the normalised
        # x in its input dtype c saved by `weight * x`
        q_norm=(F32 + s) * N * q + F32 * N * h if qk_norm else 0,
        k_norm=(F32 + s) * N * kv * hd + F32 * N * kv if qk_norm else 0,
    )

