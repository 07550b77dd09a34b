"""Grouped MoE with MXFP4 expert weights in Triton.

The T*k (token, slot) pairs are grouped by expert with `moe_align` (each expert's rows padded to a multiple
of BLOCK_M), so every BLOCK_M-row tile belongs to exactly one expert. `grouped_mxfp4_matmul` runs one
program per (M-tile, N-tile): it gathers the tile's activation rows, streams that expert's packed weight
tile, dequantizes it in registers and accumulates with tl.dot, optionally scales rows by their routing
weight, and writes each row back to its slot. `moe_sum` then reduces the k slots of every token.

The layer is: gate_up = grouped(x) -> silu(gate) * up -> down = grouped(act) * weight -> sum over k.
"""

from __future__ import annotations

import torch

from ultraspeed.kernels.reference import moe_align
from ultraspeed.kernels.triton_activation import silu_and_mul
from ultraspeed.kernels.triton_compat import next_power_of_2, require_triton, tl, triton
from ultraspeed.kernels.triton_mxfp4 import check_mxfp4_shapes, load_mxfp4_tile

_BLOCK_M = 16  # also the padding granularity of moe_align; small because decode routes few rows per expert
_BLOCK_N = 64
_BLOCK_K = 64


@triton.jit
def _grouped_mxfp4_kernel(
    a_ptr,
    blocks_ptr,
    scales_ptr,
    out_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_post_padded_ptr,
    weights_ptr,
    num_slots,
    rows_per_a_row,
    N,
    K,
    stride_am,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    # The id buffers may be longer than what moe_align filled; the true length lives on the device.
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_mask = slots < num_slots  # padding rows hold the sentinel num_slots
    a_rows = (slots // rows_per_a_row).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    expert_blocks = blocks_ptr + expert * N * (K // 2)
    expert_scales = scales_ptr + expert * N * (K // 32)

    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + rk[None, :],
                    mask=slot_mask[:, None] & (rk < K)[None, :], other=0.0)
        w = load_mxfp4_tile(expert_blocks, expert_scales, rn, n_mask, k0, K, BLOCK_K).to(a.dtype)
        acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
    if HAS_WEIGHTS:
        acc = acc * tl.load(weights_ptr + slots, mask=slot_mask, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + slots[:, None].to(tl.int64) * N + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=slot_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_sum_kernel(x_ptr, out_ptr, N, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(x_ptr + (token * TOP_K + j) * N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * N + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def grouped_mxfp4_matmul(
    a: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_post_padded: torch.Tensor,
    num_slots: int,
    rows_per_a_row: int,
    slot_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[s] = a[s // rows_per_a_row] @ W[expert(s)].T (* slot_weights[s]) for every slot s < num_slots.

    a [rows, K]; blocks/scales pack W [E, N, K]; the ids come from `moe_align(..., block_m=_BLOCK_M)`.
    rows_per_a_row is top_k when a holds one row per token (the gate_up GEMM) and 1 when it holds one row
    per slot (the down GEMM). Returns [num_slots, N] in a's dtype.
    """
    require_triton()
    check_mxfp4_shapes(blocks, scales)
    _, n, groups = scales.shape
    k = groups * 32
    if a.shape[-1] != k:
        raise ValueError(f"activations have K={a.shape[-1]} but the expert weights have K={k}")
    if a.stride(-1) != 1:
        a = a.contiguous()
    out = torch.empty(num_slots, n, dtype=a.dtype, device=a.device)
    if expert_ids.numel():
        grid = (expert_ids.numel(), triton.cdiv(n, _BLOCK_N))
        _grouped_mxfp4_kernel[grid](
            a, blocks.contiguous(), scales.contiguous(), out, sorted_ids, expert_ids, num_post_padded,
            slot_weights, num_slots, rows_per_a_row, n, k, a.stride(0),
            HAS_WEIGHTS=slot_weights is not None, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
        )
    return out


def moe_sum(x: torch.Tensor) -> torch.Tensor:
    """Reduce [T, k, N] over the k routed slots (fp32 accumulation) -> [T, N]."""
    require_triton()
    tokens, top_k, n = x.shape
    x = x.contiguous()
    out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    if out.numel():
        block_n = min(1024, next_power_of_2(n))
        _moe_sum_kernel[(tokens, triton.cdiv(n, block_n))](x, out, n, TOP_K=top_k, BLOCK_N=block_n)
    return out


def grouped_moe_mxfp4(
    x: torch.Tensor,
    w1_blocks: torch.Tensor,
    w1_scales: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts with MXFP4 weights; same contract as `reference.grouped_moe_mxfp4`.

    The gate_up and activation intermediates are kept in x's dtype (the usual trade-off of unfused MoE).
    """
    require_triton()
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts = w1_blocks.shape[0]
    intermediate = w2_blocks.shape[2] * 32
    num_slots = num_tokens * top_k
    sorted_ids, expert_ids, num_post_padded = moe_align(topk_ids, num_experts, _BLOCK_M)

    gate_up = grouped_mxfp4_matmul(
        x, w1_blocks, w1_scales, sorted_ids, expert_ids, num_post_padded, num_slots, rows_per_a_row=top_k
    )
    act = silu_and_mul(gate_up[:, :intermediate], gate_up[:, intermediate:])
    down = grouped_mxfp4_matmul(
        act, w2_blocks, w2_scales, sorted_ids, expert_ids, num_post_padded, num_slots, rows_per_a_row=1,
        slot_weights=topk_weights.flatten().contiguous(),
    )
    return moe_sum(down.view(num_tokens, top_k, hidden))
