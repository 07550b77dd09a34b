"""Rotary position embedding (HF rotate_half convention) in Triton, full or partial: one program per
(head row, token), rotating the first R channels and copying the rest."""

from __future__ import annotations

import torch

from ultraspeed.kernels.triton_compat import next_power_of_2, require_triton, tl, triton


@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    n_tokens,
    head_dim,
    rot_dim,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    token = row % n_tokens
    cols = tl.arange(0, BLOCK_D)
    in_row = cols < head_dim
    rotating = cols < rot_dim
    half = rot_dim // 2
    # rotate_half: channel c < R/2 pairs with c + R/2 and takes its negation; channel c >= R/2 pairs with c - R/2.
    partner = tl.where(cols < half, cols + half, cols - half)
    sign = tl.where(cols < half, -1.0, 1.0)
    x = tl.load(x_ptr + row * head_dim + cols, mask=in_row, other=0.0).to(tl.float32)
    x_partner = tl.load(x_ptr + row * head_dim + partner, mask=rotating, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * rot_dim + cols, mask=rotating, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * rot_dim + cols, mask=rotating, other=0.0).to(tl.float32)
    out = x * cos + sign * x_partner * sin
    tl.store(out_ptr + row * head_dim + cols, out.to(out_ptr.dtype.element_ty), mask=in_row)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on x [..., T, D] with cos/sin [T, R], R <= D; same contract as `reference.apply_rope`."""
    require_triton()
    n_tokens, head_dim = x.shape[-2], x.shape[-1]
    rot_dim = cos.shape[-1]
    if rot_dim > head_dim or rot_dim % 2:
        raise ValueError(f"rotary dim {rot_dim} must be even and at most head_dim {head_dim}")
    xc = x.contiguous()
    out = torch.empty_like(xc)
    n_rows = xc.numel() // head_dim
    if n_rows:
        _rope_kernel[(n_rows,)](
            xc, cos.contiguous(), sin.contiguous(), out, n_tokens, head_dim, rot_dim,
            BLOCK_D=next_power_of_2(head_dim),
        )
    return out
