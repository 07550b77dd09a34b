"""The compiled CPU decode kernels match their dequantize-then-F.linear references."""

from __future__ import annotations

import pytest
import torch

from ultraspeed.kernels import cpu_gemm as cg
from ultraspeed.quant.mxfp4 import quantize_mxfp4

pytestmark = pytest.mark.skipif(not cg.is_available(), reason="cpu_gemm extension unavailable (see log)")

# (M, N, K): M = 1 (gemv), 2..8 (fused small-M), >= 9 (tiled) incl. a remainder block; odd N, N < tile.
SHAPES = [(1, 7, 32), (1, 577, 576), (2, 65, 64), (3, 33, 96), (4, 130, 1536), (5, 3, 64), (7, 33, 64), (8, 65, 96),
          (16, 577, 576), (19, 101, 160)]


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    # Same products, different summation order: fp32 rounding relative to the output's magnitude.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5 * ref.abs().max().item() + 1e-6)


def _mxfp4(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(117, 132, (n, k // 32), dtype=torch.uint8, generator=gen)
    return blocks, scales


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_matches_reference(m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n)
    packed = cg.pack_int8(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen)
    _assert_close(cg.int8_linear(x, packed), cg.int8_linear_ref(x, packed))


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fp16_matches_reference(m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n)
    packed = cg.pack_fp16(torch.randn(n, k, generator=gen))
    x = torch.randn(m, k, generator=gen)
    _assert_close(cg.fp16_linear(x, packed), cg.fp16_linear_ref(x, packed))


def four_bit(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 weights [n, k] that are exactly Q4_1 (d * code + m per group of 32, fp16 d and m), as a GGUF loader
    decodes them; every group uses codes 0 and 15, as llama.cpp's quantizer produces."""
    d = (torch.rand(n, k // 32, 1, generator=gen) * 0.2).half().float()
    m = (-torch.rand(n, k // 32, 1, generator=gen)).half().float()
    codes = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
    codes[..., 0], codes[..., -1] = 0, 15
    return (codes * d + m).reshape(n, k)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_q4_matches_reference_and_repacks_4bit_weights_exactly(m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = four_bit(n, k, gen)
    packed = cg.pack_q4(w)
    assert packed is not None and torch.equal(cg.dequantize_q4(packed), w)
    x = torch.randn(m, k, generator=gen)
    _assert_close(cg.q4_linear(x, packed), cg.q4_linear_ref(x, packed))
    _assert_close(cg.q4_linear(x, packed), torch.nn.functional.linear(x, w))


def test_pack_q4_refuses_weights_that_are_not_4bit() -> None:
    gen = torch.Generator().manual_seed(0)
    w = four_bit(8, 64, gen)
    assert cg.pack_q4(torch.randn(8, 64, generator=gen)) is None          # fp32 weights: packing would lose
    w[3, 40] += 1e-3                                                      # one weight off the grid
    assert cg.pack_q4(w) is None
    constant = torch.full((2, 32), 0.25)                                  # d = 0: every weight is the minimum
    assert torch.equal(cg.dequantize_q4(cg.pack_q4(constant)), constant)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_mxfp4_matches_reference(m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n)
    blocks, scales = _mxfp4(n, k, gen)
    x = torch.randn(m, k, generator=gen)
    _assert_close(cg.mxfp4_linear(x, blocks, scales), cg.mxfp4_linear_ref(x, blocks, scales))


def test_mxfp4_reference_follows_gpt_oss_layout() -> None:
    # Byte j of a block holds element 2j in its low nibble and 2j+1 in its high nibble.
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x21  # element 0 = code 1 (0.5), element 1 = code 2 (1.0)
    blocks[0, 0, 15] = 0xF9  # element 30 = code 9 (-0.5), element 31 = code 15 (-6.0)
    w = cg.dequantize_mxfp4(blocks, torch.tensor([[128]], dtype=torch.uint8))  # scale 2
    expected = torch.zeros(1, 32)
    expected[0, [0, 1, 30, 31]] = torch.tensor([1.0, 2.0, -1.0, -12.0])
    assert torch.equal(w, expected)
    # Every code through the kernel: x = one-hot rows read the weights back exactly.
    blocks = torch.arange(256, dtype=torch.uint8).reshape(2, 8, 16)  # N=2, K=256: all 256 bytes
    scales = torch.tensor([[0, 1, 100, 126, 127, 128, 150, 200]] * 2, dtype=torch.uint8)
    eye = torch.eye(256)
    assert torch.equal(cg.mxfp4_linear(eye, blocks, scales), cg.dequantize_mxfp4(blocks, scales).T)


def test_mxfp4_quantized_weights_and_nan_scale() -> None:
    blocks, scales = quantize_mxfp4(torch.randn(33, 96, generator=torch.Generator().manual_seed(1)))
    scales[5, 1] = 255  # E8M0 NaN: poisons output column 5 only, as in the reference
    x = torch.randn(3, 96)
    out, ref = cg.mxfp4_linear(x, blocks, scales), cg.mxfp4_linear_ref(x, blocks, scales)
    assert out[:, 5].isnan().all() and ref[:, 5].isnan().all()
    keep = torch.arange(33) != 5
    _assert_close(out[:, keep], ref[:, keep])


def test_pack_int8_error_is_half_a_step() -> None:
    w = torch.randn(64, 96)
    w[3, :32] = 0  # an all-zero group must not divide by zero
    packed = cg.pack_int8(w)
    err = (cg.dequantize_int8(packed) - w).abs().reshape(64, 3, 32)
    assert torch.all(err <= packed.scales[..., None] * 0.5 + 1e-7)
    assert torch.all(packed.qweight[3, :32] == 0)


def test_leading_dims_noncontiguous_x_and_out() -> None:
    packed = cg.pack_int8(torch.randn(40, 64))
    x = torch.randn(2, 3, 128)[..., ::2]  # [2, 3, 64], not contiguous
    ref = cg.int8_linear_ref(x, packed)
    out = torch.full((2, 3, 40), float("nan"))
    assert cg.int8_linear(x, packed, out=out) is out
    _assert_close(out, ref)
    assert cg.int8_linear(torch.empty(0, 64), packed).shape == (0, 40)


def test_rejects_bad_arguments() -> None:
    packed = cg.pack_fp16(torch.randn(8, 64))
    with pytest.raises(ValueError):
        cg.fp16_linear(torch.randn(2, 64, dtype=torch.float64), packed)
    with pytest.raises(ValueError):
        cg.fp16_linear(torch.randn(2, 32), packed)
    with pytest.raises(ValueError):
        cg.fp16_linear(torch.randn(2, 64), packed, out=torch.empty(2, 7))
    with pytest.raises(ValueError):
        cg.pack_int8(torch.randn(8, 48))  # K not a multiple of 32
    blocks, scales = _mxfp4(8, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        cg.mxfp4_linear(torch.randn(1, 64), blocks[:, :, :8], scales)
    with pytest.raises(ValueError):
        cg.mxfp4_linear(torch.randn(1, 64), blocks.transpose(0, 1), scales)
