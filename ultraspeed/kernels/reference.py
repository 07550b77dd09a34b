"""Plain-PyTorch reference implementations of every fused kernel: the oracle the Triton kernels are tested
against, and a slow but portable fallback on any device.

Conventions shared by all functions here:
- Arithmetic happens in float32 and the result is cast back to the input dtype at the end, so a kernel that
  accumulates in fp32 matches these to rounding error.
- Packed MXFP4 weights follow the gpt-oss layout: a weight W [N, K] (out, in) is `blocks` uint8
  [N, K//32, 16] with element 2j in the low nibble of byte j and 2j+1 in the high nibble, plus `scales`
  uint8 [N, K//32] holding E8M0 exponents (2^(s-127), 0xFF = NaN). Expert weights add a leading E dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E8M0_NAN = 0xFF

# E2M1 code -> value; codes 8..15 are the negatives of 0..7 (sign bit is bit 3).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


# --------------------------------------------------------------------------------------------- norms


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * w."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd * w.float()).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: returns (rms_norm(x + residual), x + residual).

    The sum is rounded to the residual dtype before it is normalised, exactly like an unfused
    `residual = x + residual; h = norm(residual)` in the model dtype, so both paths agree bit for bit.
    """
    new_residual = (x.float() + residual.float()).to(residual.dtype)
    return rms_norm(new_residual, w, eps).to(x.dtype), new_residual


# ---------------------------------------------------------------------------------------- activation


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


# ---------------------------------------------------------------------------------------------- rope


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF "rotate_half" convention, on x [..., T, D] with cos/sin [T, R].

    R == D is full RoPE. R < D (even) is partial RoPE: the first R channels rotate, the rest pass through.
    """
    rot = cos.shape[-1]
    x32 = x.float()
    xr, xpass = x32[..., :rot], x32[..., rot:]
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = xr * cos.float() + rotated * sin.float()
    return torch.cat((out, xpass), dim=-1).to(x.dtype)


# --------------------------------------------------------------------------------------------- mxfp4


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unpack gpt-oss MXFP4 ([..., G, 16] codes, [..., G] exponents) to a dense [..., G*32] tensor.

    Products are exact in fp32 except beyond its range (codes >= 4 under exponents 253-254), so fp64 output
    is computed in fp64.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    lut = torch.tensor(E2M1_VALUES, dtype=compute, device=blocks.device)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    values = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., G, 32]: even elements low nibble
    scale = torch.exp2(scales.to(compute) - 127).masked_fill(scales == E8M0_NAN, float("nan"))
    return (values * scale.unsqueeze(-1)).flatten(-2).to(dtype)


def mxfp4_matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T for a packed W [N, K]; result [M, N] in x's dtype."""
    w = mxfp4_dequantize(blocks, scales, torch.float32)
    return (x.float() @ w.T).to(x.dtype)


# ----------------------------------------------------------------------------------------------- moe


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the T*k (token, slot) pairs by expert, each group padded to a multiple of block_m.

    Returns
    - sorted_token_ids int32 [P]: flat slot indices t*k + j, grouped by expert in slot order; padding holds
      the sentinel T*k (an index past the last slot, so kernels mask it out);
    - expert_ids int32 [P // block_m]: the expert each block_m-row tile belongs to;
    - num_tokens_post_padded int32 [1]: P, as a tensor so a device implementation needs no host sync.
    Experts that receive no tokens get no tiles.
    """
    flat = topk_ids.flatten().long()
    num_slots = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(counts, 0) - counts
    padded_start = torch.cumsum(padded, 0) - padded

    # A stable sort keeps each expert's slots in token order; a slot's destination is its expert's padded
    # start plus its rank within the expert.
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(num_slots, device=flat.device) - start[expert_of]
    total = int(padded.sum())
    sorted_ids = torch.full((total,), num_slots, dtype=torch.int32, device=flat.device)
    sorted_ids[padded_start[expert_of] + rank] = order.to(torch.int32)

    experts = torch.arange(num_experts, device=flat.device)
    expert_ids = torch.repeat_interleave(experts, padded // block_m).to(torch.int32)
    num_post_padded = torch.tensor([total], dtype=torch.int32, device=flat.device)
    return sorted_ids, expert_ids, num_post_padded


def grouped_moe_mxfp4(
    x: torch.Tensor,
    w1_blocks: torch.Tensor,
    w1_scales: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts with MXFP4 weights: out[t] = sum_j w[t,j] * down_e(silu(gate_e x) * up_e x).

    x [T, H]; w1 packs [E, 2I, H] with rows [0, I) the gate and [I, 2I) the up projection; w2 packs [E, H, I];
    topk_ids / topk_weights [T, k]. Only the experts that receive tokens are dequantized.
    """
    num_tokens, hidden = x.shape
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    token_of_slot = torch.arange(num_tokens, device=x.device).repeat_interleave(topk_ids.shape[1])
    flat_ids = topk_ids.flatten()
    flat_weights = topk_weights.flatten().float()
    for expert in flat_ids.unique().tolist():
        slots = (flat_ids == expert).nonzero().squeeze(1)
        tokens = token_of_slot[slots]
        w1 = mxfp4_dequantize(w1_blocks[expert], w1_scales[expert], torch.float32)
        w2 = mxfp4_dequantize(w2_blocks[expert], w2_scales[expert], torch.float32)
        gate, up = (x[tokens].float() @ w1.T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w2.T
        out.index_add_(0, tokens, y * flat_weights[slots, None])
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------- attention


def block_attention_mask(
    lengths: torch.Tensor, num_queries: int, num_keys: int, causal_block: bool
) -> torch.Tensor:
    """Boolean [B, Tq, S] mask: query i of sequence b sits at position lengths[b] - Tq + i and sees every
    valid key before the block, plus either the whole block (bidirectional) or the block up to itself."""
    key_pos = torch.arange(num_keys, device=lengths.device)
    query_pos = lengths[:, None] - num_queries + torch.arange(num_queries, device=lengths.device)
    mask = key_pos[None, None, :] < lengths[:, None, None]
    if causal_block:
        mask = mask & (key_pos[None, None, :] <= query_pos[:, :, None])
    return mask


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    causal_block: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of a block of Tq new queries against a KV cache, GQA, per-sequence lengths.

    q [B, Hq, Tq, D]; k_cache [B, Hkv, S, D]; v_cache [B, Hkv, S, Dv]; lengths [B] counts the valid cache
    entries of each sequence, the query block included (its keys already written at the last Tq valid
    positions). Returns [B, Hq, Tq, Dv]. scale defaults to 1/sqrt(D).
    """
    group = q.shape[1] // k_cache.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = k_cache.float().repeat_interleave(group, dim=1)
    v = v_cache.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    mask = block_attention_mask(lengths, q.shape[2], k_cache.shape[2], causal_block)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)
