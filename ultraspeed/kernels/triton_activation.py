"""SwiGLU (silu(gate) * up) in Triton. Rows may be strided so that the gate and up halves of one fused
gate_up projection output can be passed as views without a copy."""

from __future__ import annotations

import torch

from ultraspeed.kernels.triton_compat import require_triton, tl, triton

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    n_cols,
    gate_row_stride,
    up_row_stride,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View t as [rows, cols] with a unit column stride, copying only if no such view exists."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in fp32; same contract as `reference.silu_and_mul`."""
    require_triton()
    g, u = _as_rows(gate), _as_rows(up)
    n_rows, n_cols = g.shape
    out = torch.empty(n_rows, n_cols, dtype=gate.dtype, device=gate.device)
    if out.numel():
        grid = (n_rows, triton.cdiv(n_cols, _BLOCK))
        _silu_and_mul_kernel[grid](g, u, out, n_cols, g.stride(0), u.stride(0), BLOCK=_BLOCK)
    return out.view(gate.shape)
