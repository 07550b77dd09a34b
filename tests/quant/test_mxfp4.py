"""Property tests for the MXFP4 format layer (ultraspeed.quant.mxfp4).

Oracles are independent of the implementation: a brute-force nearest-value search over the E2M1 grid, exact
float64 / Python-float arithmetic on powers of two, and the gpt-oss decode formula (LUT + ldexp).
"""

from __future__ import annotations

import math

import pytest
import torch

from ultraspeed.quant.mxfp4 import (
    BITS_PER_WEIGHT,
    E2M1_VALUES,
    SCALE_RULES,
    MXFP4Tensor,
    dequantize_mxfp4,
    e2m1_lut,
    e8m0_to_float,
    fake_quantize_mxfp4,
    pack_nibbles,
    quantize_mxfp4,
    unpack_nibbles,
)

GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: tells -0.0 from +0.0, and NaN == NaN when the payloads match."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]),
                                                                     b.view(INT_VIEW[b.dtype]))


def block_scale(scales: torch.Tensor) -> torch.Tensor:
    """X = 2^(s - 127) per block in float64, via Python's exact ldexp (independent of e8m0_to_float)."""
    return torch.tensor([math.ldexp(1.0, int(s) - 127) for s in scales.flatten()],
                        dtype=torch.float64).reshape(scales.shape)


def nearest_grid_code(s: torch.Tensor) -> torch.Tensor:
    """Brute force: code 0..7 of the E2M1 magnitude nearest to s >= 0; of two equally near, the even code."""
    grid = torch.tensor(GRID, dtype=torch.float64)
    dist = (s.double().unsqueeze(-1) - grid).abs()
    nearest = dist == dist.min(-1, keepdim=True).values
    even_nearest = nearest & (torch.arange(8) % 2 == 0)
    return torch.where(even_nearest.any(-1), even_nearest.int().argmax(-1), nearest.int().argmax(-1))


def spread_blocks(rows: int, k: int, seed: int, dtype=torch.float32, span: int = 40) -> torch.Tensor:
    """Gaussian data whose blocks live at very different magnitudes (2^-span .. 2^span)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k // 32, 32, generator=g, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-span, span + 1, (rows, k // 32, 1), generator=g).double())
    return x.reshape(rows, k).to(dtype)


def canonical_grid_blocks(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes and scale bytes 0..254 where each block's largest magnitude is 4 or 6 (code 6 or 7), as
    floor and even always leave it."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n, 32), generator=g, dtype=torch.uint8) << 3
    magnitude = torch.randint(0, 6, (n, 32), generator=g, dtype=torch.uint8)  # up to 3.0 ...
    top = torch.arange(n), torch.randint(0, 32, (n,), generator=g)
    magnitude[top] = torch.randint(6, 8, (n,), generator=g, dtype=torch.uint8)  # ... then one 4 or 6 per block
    scales = torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8)
    return pack_nibbles(sign | magnitude), scales


# ------------------------------------------------------------------------------------------------- format


def test_e2m1_table() -> None:
    assert E2M1_VALUES == (0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6)
    assert [math.copysign(1.0, v) for v in E2M1_VALUES] == [1.0] * 8 + [-1.0] * 8  # code 8 is -0.0
    lut = e2m1_lut(torch.bfloat16)
    assert lut.dtype == torch.bfloat16 and lut.tolist() == list(E2M1_VALUES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_code_under_every_scale(dtype: torch.dtype) -> None:
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)  # one block holding every code twice
    scales = torch.arange(255, dtype=torch.uint8)
    blocks = pack_nibbles(codes).expand(255, 16).contiguous()
    out = dequantize_mxfp4(blocks, scales, dtype).reshape(255, 32)  # one row of 255 blocks
    exact = torch.tensor([[math.ldexp(E2M1_VALUES[c], s - 127) for c in codes.tolist()] for s in range(255)],
                         dtype=torch.float64)
    assert same_bits(out, exact.to(dtype))  # exact, -0.0 included; in fp32, ±inf past its max


def test_e8m0_decode_is_exact_and_nan() -> None:
    s = torch.arange(256, dtype=torch.uint8)
    x = e8m0_to_float(s, torch.float32)
    assert torch.isnan(x[255])
    assert x[:255].tolist() == [math.ldexp(1.0, e - 127) for e in range(255)]


def test_nibble_order_is_gpt_oss() -> None:
    codes = torch.arange(32, dtype=torch.uint8) % 16  # element i has code i % 16
    packed = pack_nibbles(codes)
    assert packed.shape == (16,)
    assert packed.tolist() == [(2 * j) % 16 | ((2 * j + 1) % 16) << 4 for j in range(16)]
    assert torch.equal(unpack_nibbles(packed), codes)


def test_pack_unpack_roundtrip_and_odd_length() -> None:
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(codes[..., :3])


def test_decode_matches_gpt_oss_formula() -> None:
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (4, 6, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (4, 6), dtype=torch.uint8, generator=g)
    lut = torch.tensor(E2M1_VALUES)
    ref = torch.empty(4, 6, 32)
    ref[..., 0::2] = lut[(blocks & 0x0F).long()]  # even element: low nibble
    ref[..., 1::2] = lut[(blocks >> 4).long()]
    ref = torch.ldexp(ref, (scales.int() - 127).unsqueeze(-1)).reshape(4, 192)
    assert same_bits(dequantize_mxfp4(blocks, scales), ref)


# ----------------------------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("scale_rule", SCALE_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_are_nearest_grid_values_ties_to_even(scale_rule: str, dtype: torch.dtype) -> None:
    span = 6 if dtype == torch.float16 else 40
    w = spread_blocks(16, 256, seed=2, dtype=dtype, span=span)
    blocks, scales = quantize_mxfp4(w, scale_rule)
    codes = unpack_nibbles(blocks).reshape(16, 8, 32)
    s = w.double().reshape(16, 8, 32).abs() / block_scale(scales).unsqueeze(-1)
    assert torch.equal((codes & 7).long(), nearest_grid_code(s))
    assert torch.equal(codes >> 3, torch.signbit(w.reshape(16, 8, 32)).to(torch.uint8))


def test_ties_go_to_even() -> None:
    # Amax 6 pins X = 1 under every rule; each midpoint between neighbours must land on the even code.
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    row = mids + [-m for m in mids] + [6.0] + [0.0] * 17
    for rule in SCALE_RULES:
        out = dequantize_mxfp4(*quantize_mxfp4(torch.tensor([row]), rule))[0]
        assert out[:14].tolist() == expected + [-e for e in expected], rule


# ---------------------------------------------------------------------------------------------- scale rules


@pytest.mark.parametrize(
    ("amax", "floor", "ceil", "even"),
    [  # expected exponent e of X = 2^e
        (6.0, 0, 0, 0),
        (6.5, 0, 1, 0),     # floor and even clip 6.5 -> 6, ceil moves up
        (7.0, 0, 1, 1),     # even: 7 would round up to 8 anyway
        (4.0, 0, 0, 0),
        (3.5, -1, 0, 0),
        (3.0, -1, -1, -1),
        (1.0, -2, -2, -2),
        (math.nextafter(6.0, 7.0), 0, 1, 0),  # the smallest float above 6 already moves ceil
    ],
)
def test_scale_rule_table(amax: float, floor: int, ceil: int, even: int) -> None:
    w = torch.zeros(1, 32, dtype=torch.float64)
    w[0, 5] = -amax
    for rule, e in (("floor", floor), ("ceil", ceil), ("even", even)):
        assert quantize_mxfp4(w, rule)[1].item() == e + 127, rule


@pytest.mark.parametrize(("scale_rule", "low", "high", "closed_low"),
                         [("floor", 4, 8, True), ("ceil", 3, 6, False), ("even", 3.5, 7, True)])
def test_block_max_lands_in_rule_interval(scale_rule: str, low: float, high: float, closed_low: bool) -> None:
    w = spread_blocks(32, 512, seed=3, span=100)
    _, scales = quantize_mxfp4(w, scale_rule)
    ratio = w.double().reshape(32, 16, 32).abs().amax(-1) / block_scale(scales)
    assert (ratio >= low).all() if closed_low else (ratio > low).all()
    assert (ratio < high).all() if scale_rule != "ceil" else (ratio <= high).all()


def test_rules_differ_as_documented() -> None:
    w = spread_blocks(64, 1024, seed=4)
    e = {rule: quantize_mxfp4(w, rule)[1].int() for rule in SCALE_RULES}
    # each rule is floor or one binade above it, and ceil >= even >= floor
    assert ((e["ceil"] - e["floor"]) <= 1).all() and (e["ceil"] >= e["even"]).all()
    assert (e["even"] >= e["floor"]).all()


# ------------------------------------------------------------------------------------------- error bounds


@pytest.mark.parametrize("scale_rule", ["ceil", "even"])
def test_error_is_at_most_half_a_grid_step(scale_rule: str) -> None:
    w = spread_blocks(32, 1024, seed=5)
    blocks, scales = quantize_mxfp4(w, scale_rule)
    x = block_scale(scales).repeat_interleave(32, dim=-1)
    err = (dequantize_mxfp4(blocks, scales, torch.float64) - w.double()).abs()
    s = w.double().abs() / x
    # Grid spacing in units of X: 0.5 below 2, then 1 on [2, 4), 2 on [4, 8) (6..7 counts: "even" clips it).
    half_step = 0.25 * torch.exp2(torch.floor(torch.log2(s)).clamp(min=0))
    assert (err <= half_step * x).all()
    assert (err <= 0.25 * torch.maximum(w.double().abs(), x)).all()  # relative: <= 25% of |w| above X


def test_ceil_never_clips() -> None:
    w = spread_blocks(32, 1024, seed=6)
    blocks, scales = quantize_mxfp4(w, "ceil")
    amax_out = dequantize_mxfp4(blocks, scales, torch.float64).reshape(32, 32, 32).abs().amax(-1)
    amax_in = w.double().reshape(32, 32, 32).abs().amax(-1)
    assert ((amax_out - amax_in).abs() <= amax_in / 4).all()
    assert (amax_out / block_scale(scales) <= 6).all()


def test_floor_saturates_to_6x() -> None:
    row = torch.linspace(-7.9, 7.9, 32)  # amax 7.9 -> X = 1 under floor
    _, scales = quantize_mxfp4(row[None], "floor")
    assert scales.item() == 127
    out = dequantize_mxfp4(*quantize_mxfp4(row[None], "floor"))[0]
    clipped = row.abs() > 6
    assert clipped.sum() > 4
    assert torch.equal(out[clipped], 6.0 * row[clipped].sign())
    # on random data the clipped elements also decode to exactly ±6X, and nothing exceeds 6X
    w = spread_blocks(32, 1024, seed=7)
    blocks, scales = quantize_mxfp4(w, "floor")
    x = block_scale(scales).repeat_interleave(32, dim=-1)
    out = dequantize_mxfp4(blocks, scales, torch.float64)
    big = w.double().abs() > 6 * x
    assert big.any() and torch.equal(out[big], 6 * x[big] * w.double()[big].sign())
    assert (out.abs() <= 6 * x).all()


@pytest.mark.parametrize("scale_rule", SCALE_RULES)
def test_gaussian_sqnr(scale_rule: str) -> None:
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(8))
    err = fake_quantize_mxfp4(w, scale_rule) - w
    sqnr_db = 10 * math.log10(w.pow(2).sum() / err.pow(2).sum())
    assert 18.0 < sqnr_db < 20.0  # RTN MXFP4 on Gaussian weights: about 18.7-19.0 dB


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("scale_rule", SCALE_RULES)
def test_grid_blocks_requantize_to_identical_bytes(scale_rule: str) -> None:
    blocks, scales = canonical_grid_blocks(4096, seed=9)
    w = dequantize_mxfp4(blocks, scales, torch.float64)  # fp64 holds up to 6 * 2^127 exactly
    b2, s2 = quantize_mxfp4(w, scale_rule)
    assert torch.equal(s2, scales) and torch.equal(b2, blocks)


@pytest.mark.parametrize("scale_rule", SCALE_RULES)
def test_any_grid_block_requantizes_losslessly(scale_rule: str) -> None:
    # arbitrary codes (small maxima, all-zero blocks included): the bytes may change, the values may not
    g = torch.Generator().manual_seed(10)
    blocks = torch.randint(0, 256, (2048, 16), dtype=torch.uint8, generator=g)
    blocks[::7] &= 0x33  # magnitudes <= 1.5
    blocks[::11] &= 0x88  # signed zeros only
    scales = torch.randint(0, 255, (2048,), dtype=torch.uint8, generator=g)
    w = dequantize_mxfp4(blocks, scales, torch.float64)
    assert same_bits(dequantize_mxfp4(*quantize_mxfp4(w, scale_rule), torch.float64), w)


@pytest.mark.parametrize("scale_rule", SCALE_RULES)
def test_reencoding_is_lossless_and_floor_even_are_idempotent(scale_rule: str) -> None:
    w = spread_blocks(32, 1024, seed=11, dtype=torch.bfloat16)
    packed = quantize_mxfp4(w, scale_rule)
    decoded = dequantize_mxfp4(*packed, torch.float32)
    # floor and even always leave the block max at 4X or 6X, which every rule re-encodes byte for byte;
    # ceil leaves 3X when amax/X < 3.5 (about 1 block in 5), and re-encoding that picks X/2.
    canonical = unpack_nibbles(packed[0]).bitwise_and(7).amax(-1) >= 6
    assert canonical.all() or scale_rule == "ceil"
    for rule in SCALE_RULES:  # "ceil" is the gpt-oss triton load path: decode, re-encode
        again = quantize_mxfp4(decoded, rule)
        assert same_bits(dequantize_mxfp4(*again, torch.float32), decoded), rule
        assert torch.equal(again[1][canonical], packed[1][canonical]), rule
        assert torch.equal(again[0][canonical], packed[0][canonical]), rule
        # mse breaks the tie between X/2 and X (both exact here) toward the larger scale: the same bytes
        smaller = 0 if rule == "mse" else 1
        assert (again[1][~canonical].int() == packed[1][~canonical].int() - smaller).all(), rule


def test_mse_rule_is_never_worse_than_any_other_rule() -> None:
    w = spread_blocks(64, 1024, seed=21, dtype=torch.float32)
    w[0, :32] *= 1e-38                                       # subnormal-range block: errors must not underflow

    def block_error(rule):
        return (dequantize_mxfp4(*quantize_mxfp4(w, rule), torch.float64) - w.double()).square() \
            .view(64, -1, 32).sum(-1)
    best = block_error("mse")
    others = {rule: block_error(rule) for rule in ("floor", "ceil", "even")}
    for rule, err in others.items():
        assert (best <= err).all(), rule
    # and it is strictly better than each fixed rule somewhere (else it would be pointless)
    assert all((best < err).any() for err in others.values())
    assert best.sum() < min(err.sum() for err in others.values())


# ---------------------------------------------------------------------------------------- special blocks


def test_zero_blocks() -> None:
    w = torch.randn(2, 128, generator=torch.Generator().manual_seed(12))
    w[0, 32:64] = 0.0
    w[1, 64:96] = -0.0
    blocks, scales = quantize_mxfp4(w)
    assert scales[0, 1] == 0 and scales[1, 2] == 0  # documented choice: the smallest scale, 2^-127
    codes = unpack_nibbles(blocks)
    assert (codes[0, 1] == 0).all() and (codes[1, 2] == 8).all()
    out = dequantize_mxfp4(blocks, scales)
    assert same_bits(out[0, 32:64], w[0, 32:64]) and same_bits(out[1, 64:96], w[1, 64:96])  # signed zeros
    assert torch.equal(quantize_mxfp4(w[:, 96:])[0], blocks[:, 3:])  # neighbours untouched


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_make_a_nan_block(bad: float) -> None:
    w = torch.randn(2, 96, generator=torch.Generator().manual_seed(13))
    w[1, 40] = bad
    blocks, scales = quantize_mxfp4(w)
    assert scales[1, 1] == 0xFF and (blocks[1, 1] == 0).all()
    assert (scales[0] != 0xFF).all() and scales[1, 0] != 0xFF and scales[1, 2] != 0xFF
    out = dequantize_mxfp4(blocks, scales)
    assert out[1, 32:64].isnan().all() and not out[0].isnan().any()
    assert not out[1, :32].isnan().any() and not out[1, 64:].isnan().any()


def test_nan_scale_decodes_to_nan_whatever_the_codes() -> None:
    blocks = torch.randint(0, 256, (3, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(14))
    out = dequantize_mxfp4(blocks, torch.tensor([127, 255, 0], dtype=torch.uint8)).reshape(3, 32)
    assert out[1].isnan().all() and not out[0].isnan().any() and not out[2].isnan().any()


def test_tiny_magnitudes_clamp_to_smallest_scale() -> None:
    t = 2.0 ** -127  # the smallest E8M0 scale; in fp32 it is a subnormal
    row = torch.zeros(32, dtype=torch.float64)
    row[:5] = torch.tensor([6 * t, t, 0.375 * t, 0.25 * t, 0.2 * t])
    for rule in SCALE_RULES:
        blocks, scales = quantize_mxfp4(row.float()[None], rule)
        assert scales.item() == 0, rule
        out = dequantize_mxfp4(blocks, scales, torch.float64)[0, :5]
        assert out.tolist() == [6 * t, t, 0.5 * t, 0.0, 0.0], rule  # 0.25 t is a tie -> 0
    deep = torch.full((1, 32), 2.0 ** -140)  # ideal scale far below 2^-127: clamped, flushes to zero
    blocks, scales = quantize_mxfp4(deep)
    assert scales.item() == 0 and (blocks == 0).all()


def test_huge_magnitudes_clamp_to_largest_scale() -> None:
    w = torch.full((1, 32), 1e300, dtype=torch.float64)
    w[0, 1] = -1e300
    for rule in SCALE_RULES:
        blocks, scales = quantize_mxfp4(w, rule)
        assert scales.item() == 254, rule  # 2^127
        out = dequantize_mxfp4(blocks, scales, torch.float64)[0]
        assert out[0].item() == 6 * 2.0 ** 127 and out[1].item() == -6 * 2.0 ** 127
    # fp32's own max rounds up to 4 * 2^126 = 2^128 under ceil: exact in fp64, beyond fp32 (documented)
    big = torch.full((1, 32), torch.finfo(torch.float32).max)
    blocks, scales = quantize_mxfp4(big, "ceil")
    assert scales.item() == 253
    assert dequantize_mxfp4(blocks, scales, torch.float64)[0, 0].item() == 2.0 ** 128
    assert dequantize_mxfp4(blocks, scales, torch.float32)[0, 0].item() == math.inf


# ------------------------------------------------------------------------------------ dtypes and shapes


def test_input_dtypes_agree() -> None:
    w = spread_blocks(8, 256, seed=15, span=4).to(torch.bfloat16)  # exactly representable in all three
    ref = quantize_mxfp4(w.double())
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        got = quantize_mxfp4(w.to(dtype))
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), dtype


def test_batched_and_noncontiguous_inputs() -> None:
    w = torch.randn(3, 64, 128, generator=torch.Generator().manual_seed(16))
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (3, 64, 4, 16) and scales.shape == (3, 64, 4)
    assert blocks.dtype == scales.dtype == torch.uint8
    for e in range(3):
        b, s = quantize_mxfp4(w[e])
        assert torch.equal(b, blocks[e]) and torch.equal(s, scales[e])
    assert dequantize_mxfp4(blocks, scales).shape == w.shape
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous along K
    assert not wt.is_contiguous() and torch.equal(quantize_mxfp4(wt)[0], blocks)


def test_empty_reduction_dim() -> None:
    blocks, scales = quantize_mxfp4(torch.empty(5, 0))
    assert blocks.shape == (5, 0, 16) and scales.shape == (5, 0)
    assert dequantize_mxfp4(blocks, scales).shape == (5, 0)


def test_shape_and_type_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.randn(4, 33))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_mxfp4(torch.ones(4, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="scale_rule"):
        quantize_mxfp4(torch.randn(4, 32), "round")  # type: ignore[arg-type]
    blocks, scales = quantize_mxfp4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="blocks must be"):
        dequantize_mxfp4(blocks[..., :8], scales)
    with pytest.raises(ValueError, match="blocks must be"):
        dequantize_mxfp4(blocks, scales[:, :1])
    with pytest.raises(TypeError, match="uint8"):
        dequantize_mxfp4(blocks.int(), scales)
    with pytest.raises(ValueError, match="blocks must be"):
        MXFP4Tensor(blocks, scales[:3], torch.float32)


# --------------------------------------------------------------------------------------- fake quant / STE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_rule", SCALE_RULES)
def test_fake_quantize_forward_is_exact_and_gradient_is_identity(dtype: torch.dtype, scale_rule: str) -> None:
    g = torch.Generator().manual_seed(17)
    w = torch.randn(16, 64, generator=g).to(dtype).requires_grad_()
    q = fake_quantize_mxfp4(w, scale_rule)
    assert q.dtype == dtype and q.requires_grad
    assert same_bits(q.detach(), dequantize_mxfp4(*quantize_mxfp4(w.detach(), scale_rule), dtype))
    upstream = torch.randn(16, 64, generator=g).to(dtype)
    q.backward(upstream)
    assert same_bits(w.grad, upstream)


def edge_case_rows(dtype: torch.dtype) -> torch.Tensor:
    """Blocks at every magnitude the format cares about: spread Gaussians, midpoints, signed zeros, NaN/Inf,
    values that flush to zero or saturate, as far as `dtype` can hold them."""
    info = torch.finfo(dtype)
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    rows = [
        mids + [-m for m in mids] + [6.0] + [0.0] * 17,
        [0.0] * 31 + [-0.0],
        [1.0, float("nan")] + [0.5] * 30,
        [float("-inf")] + [-2.0] * 31,
        [info.tiny / 4] * 16 + [-info.tiny] * 16,                # subnormal and smallest normal
        [info.max] + [info.max / 3] * 15 + [-info.max / 7] * 16,  # the top binade
        [5.5] + [-3.3] * 31,                                      # amax/X where ceil gives 6X
    ]
    spread = spread_blocks(8, 256, seed=23, dtype=torch.float64, span=6 if dtype == torch.float16 else 40)
    return torch.cat([torch.tensor(rows, dtype=torch.float64).repeat(1, 8), spread]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_rule", SCALE_RULES)
def test_fake_quantize_is_quantize_then_dequantize_bit_for_bit(dtype: torch.dtype, scale_rule: str) -> None:
    # The forward pass skips codes (nearest value times scale); export goes through codes and bytes.
    w = edge_case_rows(dtype)
    packed = dequantize_mxfp4(*quantize_mxfp4(w, scale_rule), dtype)
    assert same_bits(fake_quantize_mxfp4(w, scale_rule), packed)


def test_fake_quantize_without_grad_and_on_grid_values() -> None:
    blocks, scales = canonical_grid_blocks(64, seed=18)
    w = dequantize_mxfp4(blocks, scales, torch.float64).reshape(4, 512)
    assert same_bits(fake_quantize_mxfp4(w), w)  # grid values are fixed points


# ---------------------------------------------------------------------------------------------- container


@pytest.mark.parametrize("shape", [(32,), (7, 64), (2, 3, 2880)])
def test_bits_per_weight_is_4_25(shape: tuple[int, ...]) -> None:
    assert BITS_PER_WEIGHT == 4.25
    t = MXFP4Tensor.quantize(torch.randn(shape))
    numel = math.prod(shape)
    assert t.nbytes == numel // 2 + numel // 32
    assert t.bits_per_weight == 4.25


def test_mxfp4_tensor_roundtrip() -> None:
    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(19)).bfloat16()
    t = MXFP4Tensor.quantize(w, "even")
    assert t.shape == w.shape and t.dtype == torch.bfloat16
    assert same_bits(t.dequantize(), fake_quantize_mxfp4(w, "even"))
    assert t.dequantize(torch.float32).dtype == torch.float32
