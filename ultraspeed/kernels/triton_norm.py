"""RMSNorm and fused residual-add + RMSNorm in Triton: one program per row, the whole row in registers
(hidden sizes of a few thousand fit), so the residual stream is read and written exactly once."""

from __future__ import annotations

import torch

from ultraspeed.kernels.triton_compat import next_power_of_2, require_triton, tl, triton


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row * n_cols + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # Round the sum to the stream's dtype before normalising, as the unfused model code would.
        s = (x + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + offs, s, mask=mask)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    require_triton()
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    out = torch.empty_like(x2)
    res2 = residual.reshape(-1, n_cols).contiguous() if residual is not None else None
    res_out = torch.empty_like(res2) if res2 is not None else None
    _rms_norm_kernel[(x2.shape[0],)](
        x2, res2, w.contiguous(), out, res_out, n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=next_power_of_2(n_cols),
    )
    new_residual = res_out.view(residual.shape) if res_out is not None else None
    return out.view(x.shape), new_residual


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; same contract as `reference.rms_norm`."""
    return _launch(x, None, w, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); same contract as `reference.add_rms_norm`."""
    normed, new_residual = _launch(x, residual, w, eps)
    assert new_residual is not None
    return normed, new_residual
