"""OCP MX v1.0 MXFP4: E2M1 elements in blocks of 32 along the reduction dim, one E8M0 scale per block.

Storage follows gpt-oss exactly. A weight W [..., K] becomes
- `blocks` uint8 [..., K//32, 16]: byte j of a block holds element 2j in its low nibble and 2j+1 in its high
  nibble; a nibble is an E2M1 code (bit 3 = sign, bits 0-2 index |value| in 0, .5, 1, 1.5, 2, 3, 4, 6);
- `scales` uint8 [..., K//32]: E8M0, the block scale is X = 2^(byte - 127); 0xFF is NaN.
An element decodes to X * E2M1[code], which costs 4 + 8/32 = 4.25 bits per weight.

Decoding is unambiguous. Encoding has two free choices, fixed here:
- Elements round to the nearest E2M1 value, ties to the even code (the Blackwell `cvt.rn.satfinite` rule),
  saturating to ±6.
- The block exponent follows one of three rules (`scale_rule`), all computed exactly from the binary
  exponent and significand of the block's absolute max, never through a rounded float log2:
    "floor": floor(log2 amax) - 2         OCP reference. amax/X in [4, 8), so values above 6X clip to 6X.
    "ceil":  ceil(log2(amax / 6))         Never clips: amax/X in (3, 6]. The gpt-oss triton load path
                                          re-encodes decoded MXFP4 with it, which is lossless.
    "even":  floor(log2 RN1(amax)) - 2    torchao EVEN: amax rounded to one mantissa bit first, so only the
                                          values that rounding would send to 6 anyway clip. amax/X in [3.5, 7).
    "mse":   floor's exponent or one more, whichever reconstructs the block with the smaller squared error
             (ties: the larger scale). Every other rule picks one of these two, so no block is worse than under
             any of them; it costs a second rounding. The decoder cannot tell: the format is the same.
  The exponent is then clamped to E8M0's [-127, 127]: tiny blocks flush toward zero, huge ones saturate.
  Re-encoding decoded MXFP4 with any rule gives back the same values. It gives back the same bytes when the
  block max decodes to 4X or 6X, as floor and even always leave it; ceil leaves 3X when amax/X < 3.5, and
  re-encoding such a block picks X/2 with doubled codes.

Special blocks:
- A block containing NaN or ±Inf gets scale 0xFF (E2M1 has neither, so the whole block decodes to NaN).
- An all-zero block gets scale byte 0 (X = 2^-127, the limit of every rule as amax -> 0) and codes 0, or 8
  for -0.0: it decodes to signed zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

BLOCK_SIZE = 32
E8M0_BIAS = 127
E8M0_NAN = 0xFF
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127  # bytes 0..254; 255 is NaN
BITS_PER_WEIGHT = (BLOCK_SIZE * 4 + 8) / BLOCK_SIZE  # 4.25: 16 code bytes + 1 scale byte per 32 weights

# E2M1 code -> value. Codes 8..15 are the negatives of 0..7 (bit 3 is the sign), -0.0 included.
E2M1_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)

ScaleRule = Literal["floor", "ceil", "even", "mse"]
SCALE_RULES: tuple[str, ...] = ("floor", "ceil", "even", "mse")

# Midpoints between consecutive magnitudes (code i, i+1). A value exactly on a midpoint goes to the even code,
# so it stays below the midpoints whose lower code is even and passes the ones whose lower code is odd.
_MIDPOINTS = tuple((a + b) / 2 for a, b in zip(E2M1_VALUES[:7], E2M1_VALUES[1:8]))
_TIES_ROUND_DOWN = _MIDPOINTS[0::2]  # 0.25, 1.25, 2.5, 5.0
_TIES_ROUND_UP = _MIDPOINTS[1::2]  # 0.75, 1.75, 3.5


def e2m1_lut(dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """The 16-entry code -> value table as a tensor."""
    return torch.tensor(E2M1_VALUES, dtype=dtype, device=device)


def e8m0_to_float(scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """E8M0 bytes -> 2^(byte - 127), 0xFF -> NaN. Exact in fp32 (2^-127 is a subnormal there) and fp64; fp16
    cannot hold most scales."""
    return torch.exp2(scales.to(dtype) - E8M0_BIAS).masked_fill(scales == E8M0_NAN, float("nan"))


def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes [..., 2n] (values < 16) -> bytes [..., n], element 2j in the low nibble of byte j."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dim, got shape {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of `pack_nibbles`: bytes [..., n] -> codes [..., 2n]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def check_scale_rule(scale_rule: str) -> None:
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown MXFP4 scale_rule {scale_rule!r}; expected one of {SCALE_RULES}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 holds bf16/fp16 exactly; fp64 input keeps fp64 so nothing is rounded before quantization.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shared_exponent(amax: Tensor, scale_rule: str) -> Tensor:
    """Per-block exponent e (X = 2^e) from the block absolute max, clamped to E8M0's range. int32."""
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
    significand = 2 * mantissa  # amax = significand * 2^k with k = exponent - 1, significand in [1, 2)
    if scale_rule == "floor":
        bump = torch.zeros_like(significand, dtype=torch.bool)
    elif scale_rule == "ceil":
        # amax / 2^(k-2) = 4 * significand exceeds 6 exactly when significand > 1.5: go one binade up.
        bump = significand > 1.5
    else:  # "even"
        # Rounding amax to one mantissa bit (ties to even) carries into the next binade from 1.75 up.
        bump = significand >= 1.75
    e = exponent - 3 + bump.to(exponent.dtype)
    # log2(0) = -inf: a zero block takes the smallest scale (frexp(0) would otherwise say exponent 0).
    e = e.masked_fill(amax == 0, E8M0_MIN_EXP)
    return e.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def _round_to_e2m1_magnitude(x: Tensor) -> Tensor:
    """Nonnegative x -> code 0..7 of the nearest E2M1 magnitude, ties to even, saturating at 6 (code 7):
    the code is the number of midpoints x has passed, and there are only 7."""
    # Seven elementwise comparisons: faster than torch.bucketize on CPU, and the tie rule is in plain sight.
    passed_down = sum((x > t).to(torch.uint8) for t in _TIES_ROUND_DOWN)
    passed_up = sum((x >= t).to(torch.uint8) for t in _TIES_ROUND_UP)
    return passed_down + passed_up


def _round_to_e2m1_value(x: Tensor) -> Tensor:
    """Nonnegative x -> the nearest E2M1 magnitude itself, the value `_round_to_e2m1_magnitude`'s code stands
    for, without forming codes (the fast path of fake quantization and of the mse rule). The grid steps by 0.5
    below 2, by 1 below 4 and by 2 above, and torch.round sends halves to even, which lands every midpoint on
    the even code: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4. Scaling by 2, 1/2
    and 2 is exact."""
    return torch.where(x < 2, torch.round(x * 2) * 0.5,
                       torch.where(x < 4, torch.round(x), (torch.round(x * 0.5) * 2).clamp_(max=6.0)))


def _mse_exponent(magnitude: Tensor, amax: Tensor) -> Tensor:
    """The "mse" rule's per-block exponent: floor's, or one more where that reconstructs the block at least as
    well. Errors are measured in units of floor's scale X: s - r is exact there (s = |x|/X and its rounding r
    lie within a factor of 2 of each other, or r = 0), and its fp64 square and sum equal the errors of the
    decoded values up to the exact factor X^2, so the choice is that of comparing decoded errors in fp64."""
    low = _shared_exponent(amax, "floor")
    high = (low + 1).clamp(max=E8M0_MAX_EXP)
    dtype = magnitude.dtype
    scale_low = torch.exp2(low.to(dtype)).unsqueeze(-1)
    scale_high = torch.exp2(high.to(dtype)).unsqueeze(-1)
    scaled = magnitude / scale_low
    errors = [(scaled - rounded).double().square().sum(-1) for rounded in (
        _round_to_e2m1_value(scaled),
        _round_to_e2m1_value(magnitude / scale_high) * (scale_high / scale_low))]
    higher = (errors[1] <= errors[0]) & (amax > 0)  # zero blocks keep the smallest scale, as every rule
    return torch.where(higher, high, low)


def _block_exponent(magnitude: Tensor, amax: Tensor, scale_rule: str) -> Tensor:
    return _mse_exponent(magnitude, amax) if scale_rule == "mse" else _shared_exponent(amax, scale_rule)


def _blocks(w: Tensor, caller: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """w [..., K] -> (x [..., K//32, 32] in the compute dtype, |x|, block amax, blocks holding NaN/Inf)."""
    if not w.is_floating_point():
        raise TypeError(f"{caller} needs a floating-point tensor, got {w.dtype}")
    if w.ndim == 0 or w.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"{caller} needs the last (reduction) dim to be a multiple of {BLOCK_SIZE}, "
            f"got shape {tuple(w.shape)}"
        )
    x = w.detach().to(_compute_dtype(w.dtype)).contiguous()
    x = x.view(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    magnitude = x.abs()
    amax = magnitude.amax(dim=-1)  # NaN and Inf propagate
    return x, magnitude, amax, ~torch.isfinite(amax)


def quantize_mxfp4(w: Tensor, scale_rule: ScaleRule = "ceil") -> tuple[Tensor, Tensor]:
    """Encode w [..., K] (K a multiple of 32, blocks along the last dim) -> (blocks [..., K//32, 16] uint8,
    scales [..., K//32] uint8). See the module docstring for the rounding and scale rules."""
    check_scale_rule(scale_rule)
    x, magnitude, amax, special = _blocks(w, "quantize_mxfp4")
    codes, scales = _encode(x, magnitude, special, _block_exponent(magnitude, amax, scale_rule))
    return pack_nibbles(codes), scales


def _encode(x: Tensor, magnitude: Tensor, special: Tensor, exponent: Tensor) -> tuple[Tensor, Tensor]:
    """Codes [..., G, 32] and E8M0 scale bytes [..., G] of blocks x under per-block exponents."""
    scales = (exponent + E8M0_BIAS).to(torch.uint8).masked_fill(special, E8M0_NAN)
    # Dividing by a power of two is exact (wherever it matters: near the rounding thresholds the quotients are
    # normal floats), so rounding happens once, in _round_to_e2m1_magnitude.
    scaled = magnitude / e8m0_to_float(scales, x.dtype).unsqueeze(-1)
    codes = _round_to_e2m1_magnitude(scaled) | (torch.signbit(x).to(torch.uint8) << 3)
    return codes.masked_fill(special.unsqueeze(-1), 0), scales  # canonical codes under a NaN scale


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode (blocks [..., G, 16], scales [..., G]) -> [..., G*32] in `dtype`.

    Products are formed in fp32 (fp64 if asked for), where they are exact; the cast to `dtype` is the only
    rounding. fp32 cannot hold |values| >= 2^128 (large codes under scale bytes 253-254): decode those to
    fp64.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim == 0 or blocks.shape[-1] != BLOCK_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks must be [..., G, {BLOCK_SIZE // 2}] with scales [..., G]; "
            f"got blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)}"
        )
    return _decode(unpack_nibbles(blocks), scales, _compute_dtype(dtype)).flatten(-2).to(dtype)


def _decode(codes: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """Codes [..., G, 32] and scale bytes [..., G] -> values [..., G, 32] in `dtype`."""
    values = e2m1_lut(dtype, codes.device)[codes.long()]
    return values * e8m0_to_float(scales, dtype).unsqueeze(-1)  # a NaN scale makes its whole block NaN


def block_scale(magnitude: Tensor, amax: Tensor, scale_rule: str) -> Tensor:
    """The power-of-two scale [..., 1] of blocks with magnitudes [..., 32] and block maxima [...] under a rule."""
    return torch.exp2(_block_exponent(magnitude, amax, scale_rule).to(magnitude.dtype)).unsqueeze(-1)


def round_to_grid(x: Tensor, scale: Tensor) -> Tensor:
    """x rounded to the nearest MXFP4 value under `scale` (broadcast), signed like x: the nearest grid value
    times the scale, exact."""
    return torch.copysign(_round_to_e2m1_value(x.abs() / scale) * scale, x)


def _quantize_dequantize(w: Tensor, scale_rule: str) -> Tensor:
    """dequantize_mxfp4(*quantize_mxfp4(w, rule), w.dtype), bit for bit, without forming codes: the nearest
    grid value times the block scale (exact), signed like the input (so -0.0 where the code would be 8), NaN
    blocks NaN. Training runs this on every expert weight at every step, where codes and their table lookup
    cost several times more."""
    check_scale_rule(scale_rule)
    x, magnitude, amax, special = _blocks(w, "fake_quantize_mxfp4")
    values = round_to_grid(x, block_scale(magnitude, amax, scale_rule))
    return values.masked_fill_(special.unsqueeze(-1), float("nan")).flatten(-2).to(w.dtype)


class _FakeQuantizeMXFP4(torch.autograd.Function):
    """Forward: exactly dequantize(quantize(w)). Backward: the straight-through estimator, dL/dw = dL/dQ(w).

    A custom Function rather than `w + (q - w).detach()`: that sum equals q in value but turns each -0.0 of q
    into +0.0, so the training forward would not be bit-identical to the exported weights.
    """

    @staticmethod
    def forward(ctx, w: Tensor, scale_rule: str) -> Tensor:
        return _quantize_dequantize(w, scale_rule)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def fake_quantize_mxfp4(w: Tensor, scale_rule: ScaleRule = "ceil") -> Tensor:
    """dequantize(quantize(w)) in w's dtype, differentiable with an identity (straight-through) gradient."""
    return _FakeQuantizeMXFP4.apply(w, scale_rule)


@dataclass(frozen=True, eq=False)  # eq would compare tensors elementwise
class MXFP4Tensor:
    """A packed MXFP4 tensor in gpt-oss layout plus the dtype it decodes to by default."""

    blocks: Tensor  # uint8 [..., K//32, 16]
    scales: Tensor  # uint8 [..., K//32]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.blocks.shape[:-1] != self.scales.shape or self.blocks.shape[-1:] != (BLOCK_SIZE // 2,):
            raise ValueError(
                f"MXFP4 blocks must be [..., G, {BLOCK_SIZE // 2}] with scales [..., G]; "
                f"got blocks {tuple(self.blocks.shape)} and scales {tuple(self.scales.shape)}"
            )

    @classmethod
    def quantize(cls, w: Tensor, scale_rule: ScaleRule = "ceil") -> MXFP4Tensor:
        return cls(*quantize_mxfp4(w, scale_rule), dtype=w.dtype)

    @property
    def shape(self) -> torch.Size:
        """Shape of the decoded tensor, [..., K]."""
        return torch.Size((*self.scales.shape[:-1], self.scales.shape[-1] * BLOCK_SIZE))

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes + self.scales.nbytes

    @property
    def bits_per_weight(self) -> float:
        """Measured from storage; always BITS_PER_WEIGHT (4.25) for a nonempty tensor."""
        return 8 * self.nbytes / self.shape.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_mxfp4(self.blocks, self.scales, dtype or self.dtype)
