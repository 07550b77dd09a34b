"""Rotary position embeddings: the frequency table for each rope variant, and how to apply it.

Tables are computed once per model (cos/sin for every position up to the context length) so a decode step
only gathers rows by position.
"""

from __future__ import annotations

import math

import torch

from ultraspeed.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, rotary_dim: int) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies for `rotary_dim` rotating dims, and the attention scaling factor (yarn)."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    scale = 1.0
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3_frequencies(inv_freq, rope)
    elif rope.rope_type == "yarn":
        inv_freq, scale = _yarn_frequencies(inv_freq, rope, rotary_dim)
    elif rope.rope_type != "default":
        raise ValueError(f"unsupported rope type {rope.rope_type!r}")
    return inv_freq.float(), scale


def _llama3_frequencies(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_frequencies(inv_freq: torch.Tensor, rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rope.original_max_position / (num_rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / rope.factor) * (1 - extrapolation) + inv_freq * extrapolation
    if rope.mscale and rope.mscale_all_dim:
        attention_scale = _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        attention_scale = _yarn_mscale(rope.factor)
    return inv_freq, attention_scale


def softmax_mscale(rope: RopeConfig) -> float:
    """Factor on the softmax scale for a scaled rope with `mscale_all_dim` (DeepSeek MLA). DeepSeek applies yarn's
    attention temperature to the whole q·k, rotary and non-rotary dims alike, through the softmax scale; its rope
    table then only carries the mscale / mscale_all_dim ratio (usually 1)."""
    if rope.rope_type == "default" or not rope.mscale_all_dim:
        return 1.0
    return _yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2


def rope_table(rope: RopeConfig, rotary_dim: int, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [max_position, rotary_dim] (each frequency repeated for both halves)."""
    inv_freq, scale = inverse_frequencies(rope, rotary_dim)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, H, T, D] with cos/sin [B, 1, T, rotary_dim]."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, passthrough], dim=-1)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Reorder pairs (x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...) so interleaved rope becomes rotate_half."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
