"""Decode / block-verify attention in Triton: a block of Tq new queries per sequence against its KV cache,
with GQA and per-sequence valid lengths. The query block occupies the last Tq valid positions and is either
causal inside the block (speculative verification) or bidirectional (block-diffusion drafting).

One program handles one (sequence, KV head) and a tile of its G*Tq query rows (G = query heads per KV
head), so each K/V tile is loaded once for the whole group. Keys are streamed in BLOCK_N chunks with an
online softmax (running max and sum in fp32).
"""

from __future__ import annotations

import math

import torch

from ultraspeed.kernels.triton_compat import next_power_of_2, require_triton, tl, triton

_BLOCK_N = 32
_MAX_BLOCK_M = 64


@triton.jit
def _decode_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lengths_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_ot,
    num_kv_heads,
    num_queries,
    group,
    head_dim,
    v_dim,
    qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
    CAUSAL_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    batch = (tl.program_id(0) // num_kv_heads).to(tl.int64)  # int64: whole-cache offsets can pass 2^31
    kv_head = tl.program_id(0) % num_kv_heads
    # Row r of the tile is query token r % Tq of query head kv_head * G + r // Tq.
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < group * num_queries
    head = kv_head * group + rows // num_queries
    token = rows % num_queries
    length = tl.load(lengths_ptr + batch)
    query_pos = length - num_queries + token

    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    d_mask = d < head_dim
    dv_mask = dv < v_dim
    q_ptrs = q_ptr + batch * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qt + d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    # A finite floor instead of -inf keeps exp2(m_old - m_new) defined when a row sees no key in a chunk.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for start in range(0, length, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_mask = keys < length
        k = tl.load(k_base + keys[None, :] * stride_ks + d[:, None], mask=d_mask[:, None] & key_mask[None, :],
                    other=0.0)
        scores = tl.dot(q, k, input_precision="ieee") * qk_scale
        visible = key_mask[None, :]
        if CAUSAL_BLOCK:
            visible = visible & (keys[None, :] <= query_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_vs + dv[None, :], mask=key_mask[:, None] & dv_mask[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + batch * stride_ob + head[:, None] * stride_oh + token[:, None] * stride_ot + dv[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dv_mask[None, :])


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    causal_block: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as `reference.decode_attention`: q [B, Hq, Tq, D], k_cache [B, Hkv, S, D],
    v_cache [B, Hkv, S, Dv], lengths [B] (>= Tq, query block included) -> [B, Hq, Tq, Dv]."""
    require_triton()
    batch, num_heads, num_queries, head_dim = q.shape
    num_kv_heads, v_dim = k_cache.shape[1], v_cache.shape[-1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    q, k_cache, v_cache = (_unit_last_stride(t) for t in (q, k_cache, v_cache))
    out = torch.empty(batch, num_heads, num_queries, v_dim, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    scale = head_dim**-0.5 if scale is None else scale
    rows = group * num_queries
    block_m = min(_MAX_BLOCK_M, max(16, next_power_of_2(rows)))
    grid = (batch * num_kv_heads, triton.cdiv(rows, block_m))
    _decode_attention_kernel[grid](
        q, k_cache, v_cache, out, lengths.contiguous(),
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num_kv_heads, num_queries, group, head_dim, v_dim, scale * math.log2(math.e),
        CAUSAL_BLOCK=causal_block, BLOCK_M=block_m, BLOCK_N=_BLOCK_N,
        BLOCK_D=max(16, next_power_of_2(head_dim)), BLOCK_DV=max(16, next_power_of_2(v_dim)),
    )
    return out
