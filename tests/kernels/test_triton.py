"""Every Triton kernel against its PyTorch reference, on the CPU interpreter (see conftest.py). Shapes are
tiny (the interpreter is slow) but chosen to hit every mask: sizes that are not multiples of the tiles,
sentinel-padded MoE tiles, several tiles per expert, several query tiles per KV head. bf16 is left to GPU
runs: the interpreter cannot tl.dot bf16 operands."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import; conftest.py does the same

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ultraspeed.kernels import reference as ref  # noqa: E402
from ultraspeed.kernels import (  # noqa: E402
    triton_activation,
    triton_attention,
    triton_compat,
    triton_moe,
    triton_mxfp4,
    triton_norm,
    triton_rope,
)

requires_triton = pytest.mark.skipif(not triton_compat.HAS_TRITON, reason="triton is not installed")
FLOAT_DTYPES = [torch.float32, torch.float16]


def _close(actual: torch.Tensor, expected: torch.Tensor, **tolerances: float) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **tolerances)


# ----------------------------------------------------------------------------------- without triton


def test_kernel_modules_import_without_triton() -> None:
    # A fresh interpreter where `import triton` fails: the modules must import and fail only on use.
    script = """
import sys
sys.modules["triton"] = None
import torch
from ultraspeed.errors import UltraSpeedError
from ultraspeed.kernels import triton_activation, triton_attention, triton_moe, triton_mxfp4, triton_norm
from ultraspeed.kernels import triton_rope
try:
    triton_norm.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6)
except UltraSpeedError as error:
    assert "Triton" in str(error)
else:
    raise AssertionError("no error without triton")
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


# ------------------------------------------------------------------------------------------ norms


@requires_triton
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rms_norm(rng: torch.Generator, device: str, dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 96, generator=rng).to(device, dtype)
    w = torch.randn(96, generator=rng).to(device, dtype)
    _close(triton_norm.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))


@requires_triton
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_add_rms_norm(rng: torch.Generator, device: str, dtype: torch.dtype) -> None:
    x, residual = torch.randn(2, 5, 96, generator=rng).to(device, dtype).unbind(0)
    w = torch.randn(96, generator=rng).to(device, dtype)
    normed, new_residual = triton_norm.add_rms_norm(x, residual, w, 1e-6)
    want_normed, want_residual = ref.add_rms_norm(x, residual, w, 1e-6)
    _close(new_residual, want_residual, rtol=0, atol=0)
    _close(normed, want_normed)


# ------------------------------------------------------------------------------------- activation


@requires_triton
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_silu_and_mul(rng: torch.Generator, device: str, dtype: torch.dtype) -> None:
    gate, up = torch.randn(2, 3, 4, 70, generator=rng).to(device, dtype).unbind(0)
    _close(triton_activation.silu_and_mul(gate, up), ref.silu_and_mul(gate, up))


@requires_triton
def test_silu_and_mul_on_halves_of_a_fused_projection(rng: torch.Generator, device: str) -> None:
    gate_up = torch.randn(5, 2 * 40, generator=rng).to(device)
    gate, up = gate_up[:, :40], gate_up[:, 40:]  # strided views, no copy
    _close(triton_activation.silu_and_mul(gate, up), ref.silu_and_mul(gate, up))


# ------------------------------------------------------------------------------------------- rope


@requires_triton
@pytest.mark.parametrize("rot_dim", [24, 8])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_apply_rope(rng: torch.Generator, device: str, rot_dim: int, dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 5, 24, generator=rng).to(device, dtype)
    cos, sin = torch.randn(2, 5, rot_dim, generator=rng).to(device, dtype).unbind(0)
    _close(triton_rope.apply_rope(x, cos, sin), ref.apply_rope(x, cos, sin))


# ------------------------------------------------------------------------------------------ mxfp4


@requires_triton
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mxfp4_matmul(rng: torch.Generator, device: str, mxfp4_weight, dtype: torch.dtype) -> None:
    # M, N, K all off the tile sizes (16, 64, 64) so every mask is exercised.
    blocks, scales, _ = mxfp4_weight(72, 96)
    blocks, scales = blocks.to(device), scales.to(device)
    x = torch.randn(5, 96, generator=rng).to(device, dtype)
    out = triton_mxfp4.mxfp4_matmul(x, blocks, scales)
    assert out.dtype == dtype and out.shape == (5, 72)
    _close(out, ref.mxfp4_matmul(x, blocks, scales), rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-3)


@requires_triton
def test_mxfp4_matmul_extreme_and_nan_scales(rng: torch.Generator, device: str, mxfp4_weight) -> None:
    blocks, scales, _ = mxfp4_weight(16, 64, low=100, high=150)
    scales[3, 1] = 0xFF  # a NaN block poisons exactly output column 3
    x = torch.randn(4, 64, generator=rng).to(device)
    out = triton_mxfp4.mxfp4_matmul(x, blocks.to(device), scales.to(device)).cpu()
    want = ref.mxfp4_matmul(x.cpu(), blocks, scales)
    assert out[:, 3].isnan().all()
    finite = torch.arange(16) != 3
    # Values span 2^-27..2^23, so sums cancel: bound the error by the output magnitude, not elementwise.
    _close(out[:, finite], want[:, finite], rtol=0, atol=1e-6 * want[:, finite].abs().max().item())


# -------------------------------------------------------------------------------------------- moe


def _skewed_routing(rng: torch.Generator, tokens: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-2 routing where expert 0 gets every token (several M tiles) and the last expert gets none."""
    others = torch.randint(1, experts - 1, (tokens, 1), generator=rng)
    topk_ids = torch.cat([torch.zeros_like(others), others], dim=1).to(torch.int32)
    return topk_ids, torch.rand(tokens, 2, generator=rng)


@requires_triton
def test_grouped_mxfp4_matmul_per_slot(rng: torch.Generator, device: str, mxfp4_weight) -> None:
    experts, tokens, n, k = 4, 20, 40, 64
    blocks, scales, dense = mxfp4_weight(experts, n, k)
    topk_ids, topk_weights = _skewed_routing(rng, tokens, experts)
    sorted_ids, expert_ids, num_post_padded = ref.moe_align(topk_ids, experts, 16)
    # Over-allocate the id buffers, as a device-side align would: tiles past num_post_padded must be skipped.
    sorted_ids = torch.cat([sorted_ids, torch.zeros(32, dtype=torch.int32)])
    expert_ids = torch.cat([expert_ids, torch.zeros(2, dtype=torch.int32)])
    x = torch.randn(tokens, k, generator=rng)
    slot_weights = topk_weights.flatten()

    out = triton_moe.grouped_mxfp4_matmul(
        x.to(device), blocks.to(device), scales.to(device), sorted_ids.to(device), expert_ids.to(device),
        num_post_padded.to(device), tokens * 2, rows_per_a_row=2, slot_weights=slot_weights.to(device),
    )
    experts_of_slot = topk_ids.flatten().long()
    rows = x.double().repeat_interleave(2, dim=0)
    expected = torch.einsum("sk,snk->sn", rows, dense[experts_of_slot]) * slot_weights.double()[:, None]
    _close(out, expected.float(), rtol=1e-5, atol=1e-4)


@requires_triton
def test_moe_sum(rng: torch.Generator, device: str) -> None:
    x = torch.randn(3, 4, 50, generator=rng).to(device)
    _close(triton_moe.moe_sum(x), x.sum(1))


@requires_triton
def test_grouped_moe_mxfp4(rng: torch.Generator, device: str, mxfp4_weight) -> None:
    experts, hidden, inter, tokens = 5, 64, 96, 20
    w1_blocks, w1_scales, _ = mxfp4_weight(experts, 2 * inter, hidden, low=122, high=126)
    w2_blocks, w2_scales, _ = mxfp4_weight(experts, hidden, inter, low=122, high=126)
    x = torch.randn(tokens, hidden, generator=rng)
    topk_ids, topk_weights = _skewed_routing(rng, tokens, experts)
    args = [t.to(device) for t in (x, w1_blocks, w1_scales, w2_blocks, w2_scales, topk_ids, topk_weights)]
    out = triton_moe.grouped_moe_mxfp4(*args)
    want = ref.grouped_moe_mxfp4(x, w1_blocks, w1_scales, w2_blocks, w2_scales, topk_ids, topk_weights)
    _close(out, want, rtol=1e-5, atol=1e-3)


# -------------------------------------------------------------------------------------- attention


@requires_triton
@pytest.mark.parametrize("causal_block", [True, False])
@pytest.mark.parametrize(
    "heads,kv_heads,num_queries",
    [(4, 2, 3), (2, 2, 1), (8, 1, 9)],  # GQA block; plain decode; 72 rows -> two query tiles per KV head
)
def test_decode_attention(
    rng: torch.Generator, device: str, causal_block: bool, heads: int, kv_heads: int, num_queries: int
) -> None:
    batch, cache, head_dim, v_dim = 3, 40, 24, 16
    q = torch.randn(batch, heads, num_queries, head_dim, generator=rng).to(device)
    k = torch.randn(batch, kv_heads, cache, head_dim, generator=rng).to(device)
    v = torch.randn(batch, kv_heads, cache, v_dim, generator=rng).to(device)
    lengths = torch.tensor([num_queries, cache, 33]).to(device)  # shortest possible, full, mid-chunk
    out = triton_attention.decode_attention(q, k, v, lengths, causal_block)
    _close(out, ref.decode_attention(q, k, v, lengths, causal_block), rtol=1e-5, atol=1e-5)


@requires_triton
def test_decode_attention_fp16_and_strided_query(rng: torch.Generator, device: str) -> None:
    # q as a [B, T, H, D] -> [B, H, T, D] transpose view, the layout a projection naturally produces.
    q = torch.randn(2, 3, 4, 32, generator=rng).to(device, torch.float16).transpose(1, 2)
    k, v = torch.randn(2, 2, 2, 20, 32, generator=rng).to(device, torch.float16).unbind(0)
    lengths = torch.tensor([5, 20]).to(device)
    out = triton_attention.decode_attention(q, k, v, lengths, True)
    _close(out, ref.decode_attention(q, k, v, lengths, True), rtol=2e-3, atol=2e-3)
