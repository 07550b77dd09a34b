"""Weight-only MXFP4 matmul in Triton: x [M, K] @ W.T with W [N, K] kept packed (gpt-oss layout) in memory
and dequantized tile by tile in registers, then fed to tl.dot with an fp32 accumulator. This is the
Hopper/Ampere approach (no FP4 tensor cores): decode is bound by weight bandwidth, and the packed weights
are 4.25 bits instead of 16.

`load_mxfp4_tile` is shared with the grouped MoE kernel.
"""

from __future__ import annotations

import torch

from ultraspeed.kernels.triton_compat import require_triton, tl, triton

_BLOCK_M = 16  # tl.dot needs >= 16 per dim; decode batches are small, so keep the M tile small
_BLOCK_N = 64
_BLOCK_K = 64  # a multiple of the 32-element MXFP4 block


@triton.jit
def e2m1_to_float(code):
    """E2M1 nibble (sign | 2-bit exponent | 1-bit mantissa) -> fp32, computed rather than looked up so it
    stays in registers: exponent 0 is the subnormal 0.5*m, otherwise (1 + m/2) * 2^(e-1)."""
    exponent = (code >> 1) & 3
    mantissa = (code & 1).to(tl.float32)
    normal = (2.0 + mantissa) * (1 << exponent).to(tl.float32) * 0.25
    magnitude = tl.where(exponent == 0, 0.5 * mantissa, normal)
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def load_mxfp4_tile(blocks_ptr, scales_ptr, rows, row_mask, k0, K, BLOCK_K: tl.constexpr):
    """Dequantize W[rows, k0:k0+BLOCK_K] of one packed [N, K] matrix into an fp32 [len(rows), BLOCK_K] tile.

    Byte c of a row holds elements 2c (low nibble) and 2c+1 (high nibble), and its E8M0 scale is that of
    MXFP4 block c // 16; we decode both nibbles, scale them, and interleave them back into element order.
    """
    byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask = row_mask[:, None] & (byte_cols < K // 2)[None, :]
    rows64 = rows.to(tl.int64)
    packed = tl.load(blocks_ptr + rows64[:, None] * (K // 2) + byte_cols[None, :], mask=mask, other=0)
    exponent = tl.load(scales_ptr + rows64[:, None] * (K // 32) + (byte_cols // 16)[None, :], mask=mask, other=127)
    # 0xFF is NaN, not 2^128; clamping first keeps the discarded branch from overflowing.
    power = tl.exp2(tl.minimum(exponent, 254).to(tl.float32) - 127.0)
    scale = tl.where(exponent == 255, float("nan"), power)
    lo = e2m1_to_float(packed & 0x0F) * scale
    hi = e2m1_to_float(packed >> 4) * scale
    return tl.reshape(tl.join(lo, hi), (rows.shape[0], BLOCK_K))


@triton.jit
def _mxfp4_matmul_kernel(
    x_ptr,
    blocks_ptr,
    scales_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                    mask=m_mask[:, None] & (rk < K)[None, :], other=0.0)
        w = load_mxfp4_tile(blocks_ptr, scales_ptr, rn, n_mask, k0, K, BLOCK_K).to(x.dtype)
        # "ieee" keeps fp32 inputs exact (no TF32); bf16 inputs ignore it.
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def check_mxfp4_shapes(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """Fail early on a malformed packed weight instead of reading out of bounds in a kernel."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")


def mxfp4_matmul(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T for packed W [N, K]; fp32 accumulation, result [M, N] in x's dtype.
    Same contract as `reference.mxfp4_matmul`."""
    require_triton()
    check_mxfp4_shapes(blocks, scales)
    n, groups = scales.shape
    k = groups * 32
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={k}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
        _mxfp4_matmul_kernel[grid](
            x, blocks.contiguous(), scales.contiguous(), out, m, n, k, x.stride(0), out.stride(0),
            BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
        )
    return out
