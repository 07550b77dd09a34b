"""The PyTorch references are the oracle for the Triton kernels, so each is checked here against the most
naive formula available: explicit loops, float64, hand-decoded bytes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ultraspeed.kernels import reference as ref

# ------------------------------------------------------------------------------------------ norms


def test_rms_norm_matches_formula(rng: torch.Generator) -> None:
    x = torch.randn(3, 5, 48, generator=rng)
    w = torch.randn(48, generator=rng)
    x64 = x.double()
    expected = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(ref.rms_norm(x, w, 1e-5), expected.float())


def test_add_rms_norm_is_add_then_norm(rng: torch.Generator) -> None:
    x, residual = torch.randn(2, 4, 64, generator=rng, dtype=torch.float64).bfloat16().unbind(0)
    w = torch.randn(64, generator=rng).bfloat16()
    normed, new_residual = ref.add_rms_norm(x, residual, w, 1e-6)
    assert new_residual.dtype == torch.bfloat16 and normed.dtype == torch.bfloat16
    assert torch.equal(new_residual, x + residual)  # same rounding as the unfused bf16 add
    assert torch.equal(normed, ref.rms_norm(x + residual, w, 1e-6))


# ------------------------------------------------------------------------------------- activation


def test_silu_and_mul_matches_formula(rng: torch.Generator) -> None:
    gate, up = torch.randn(2, 7, 33, generator=rng).unbind(0)
    expected = gate.double() / (1 + torch.exp(-gate.double())) * up.double()
    torch.testing.assert_close(ref.silu_and_mul(gate, up), expected.float())


# ------------------------------------------------------------------------------------------- rope


def _rope_by_hand(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Channel by channel: c < R/2 pairs with c + R/2 (negated partner), channels >= R copy through."""
    out = x.clone().double()
    rot = cos.shape[-1]
    half = rot // 2
    for c in range(rot):
        partner = x[..., c + half] * -1 if c < half else x[..., c - half]
        out[..., c] = x[..., c] * cos[:, c] + partner * sin[:, c]
    return out


@pytest.mark.parametrize("rot_dim", [16, 8])
def test_apply_rope_matches_channel_loop(rng: torch.Generator, rot_dim: int) -> None:
    x = torch.randn(2, 3, 5, 16, generator=rng)
    cos, sin = torch.randn(2, 5, rot_dim, generator=rng).unbind(0)
    torch.testing.assert_close(ref.apply_rope(x, cos, sin), _rope_by_hand(x, cos, sin).float())


def test_apply_rope_rotates_pairs_by_the_position_angle(rng: torch.Generator) -> None:
    # With real angles, each (c, c + D/2) pair is a 2-D rotation: norms are kept and position 0 is identity.
    head_dim, positions = 8, torch.arange(4.0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2) / head_dim))
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)
    x = torch.randn(3, 4, head_dim, generator=rng)
    out = ref.apply_rope(x, angles.cos(), angles.sin())
    torch.testing.assert_close(out[:, 0], x[:, 0])
    pair_norm = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(x))


# ------------------------------------------------------------------------------------------ mxfp4


def test_mxfp4_dequantize_hand_decoded_bytes() -> None:
    # Byte 0x2F: low nibble F (-6) is element 0, high nibble 2 (+1.0) is element 1. Byte 0x71: 0.5 then 6.
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0], blocks[0, 0, 1] = 0x2F, 0x71
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2^1
    out = ref.mxfp4_dequantize(blocks, scales, torch.float32)
    assert out.shape == (1, 32)
    assert out[0, :4].tolist() == [-12.0, 2.0, 1.0, 12.0]
    assert not out[0, 4:].any()


def test_mxfp4_dequantize_matches_lut(mxfp4_weight) -> None:
    blocks, scales, dense = mxfp4_weight(3, 5, 96, low=124, high=129)
    assert torch.equal(ref.mxfp4_dequantize(blocks, scales, torch.float32), dense.float())
    assert torch.equal(ref.mxfp4_dequantize(blocks, scales, torch.bfloat16), dense.bfloat16())


def test_mxfp4_dequantize_every_exponent_in_float64(mxfp4_weight) -> None:
    blocks, scales, dense = mxfp4_weight(255, 64, low=0, high=254)
    scales[:, 0] = torch.arange(255, dtype=torch.uint8)  # 0 (2^-127) to 254 (2^127, past fp32 with code 6)
    blocks[:, 0] = 0x77  # +6 everywhere in the block
    expected = 6.0 * torch.pow(2.0, torch.arange(255, dtype=torch.float64) - 127)
    out = ref.mxfp4_dequantize(blocks, scales, torch.float64)
    assert torch.equal(out[:, :32], expected[:, None].expand(255, 32))
    assert torch.equal(out[:, 32:], dense[:, 32:])


def test_mxfp4_dequantize_agrees_with_quant_module(mxfp4_weight) -> None:
    quant = pytest.importorskip("ultraspeed.quant.mxfp4")
    blocks, scales, _ = mxfp4_weight(4, 6, 64, low=100, high=160)
    scales[0, 0, 0] = 0xFF
    ours = ref.mxfp4_dequantize(blocks, scales, torch.float32)
    torch.testing.assert_close(quant.dequantize_mxfp4(blocks, scales, torch.float32), ours, rtol=0, atol=0,
                               equal_nan=True)


def test_mxfp4_nan_scale_poisons_only_its_block(mxfp4_weight) -> None:
    blocks, scales, _ = mxfp4_weight(2, 64)
    scales[1, 0] = 0xFF
    out = ref.mxfp4_dequantize(blocks, scales, torch.float32)
    assert out[1, :32].isnan().all()
    assert not out[0].isnan().any() and not out[1, 32:].isnan().any()


def test_mxfp4_matmul_is_x_times_w_transposed(rng: torch.Generator, mxfp4_weight) -> None:
    blocks, scales, dense = mxfp4_weight(24, 64)
    x = torch.randn(5, 64, generator=rng)
    torch.testing.assert_close(ref.mxfp4_matmul(x, blocks, scales), (x.double() @ dense.T).float())


# -------------------------------------------------------------------------------------------- moe


def _align_by_hand(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[list[int], list[int]]:
    flat = topk_ids.flatten().tolist()
    sentinel = len(flat)
    sorted_ids: list[int] = []
    expert_ids: list[int] = []
    for expert in range(num_experts):
        slots = [s for s, e in enumerate(flat) if e == expert]
        tiles = math.ceil(len(slots) / block_m)
        sorted_ids += slots + [sentinel] * (tiles * block_m - len(slots))
        expert_ids += [expert] * tiles
    return sorted_ids, expert_ids


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_moe_align_matches_loop(rng: torch.Generator, block_m: int) -> None:
    num_experts = 6
    topk_ids = torch.stack([torch.randperm(num_experts, generator=rng)[:2] for _ in range(7)])
    topk_ids[topk_ids == 5] = 4  # leave expert 5 without tokens: it must get no tile
    topk_ids = topk_ids.to(torch.int32)
    sorted_ids, expert_ids, num_post_padded = ref.moe_align(topk_ids, num_experts, block_m)
    want_sorted, want_experts = _align_by_hand(topk_ids, num_experts, block_m)
    assert sorted_ids.tolist() == want_sorted
    assert expert_ids.tolist() == want_experts
    assert num_post_padded.tolist() == [len(want_sorted)]
    assert sorted_ids.dtype == expert_ids.dtype == torch.int32


def _moe_by_hand(x, w1, w2, topk_ids, topk_weights) -> torch.Tensor:
    """One token, one routed slot at a time, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = w2.shape[-1]
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            h = w1[e] @ x[t].double()
            out[t] += topk_weights[t, j] * (w2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


def test_grouped_moe_matches_per_token_loop(rng: torch.Generator, mxfp4_weight) -> None:
    experts, hidden, inter, tokens, top_k = 4, 64, 32, 5, 2
    w1_blocks, w1_scales, w1 = mxfp4_weight(experts, 2 * inter, hidden, low=122, high=126)
    w2_blocks, w2_scales, w2 = mxfp4_weight(experts, hidden, inter, low=122, high=126)
    x = torch.randn(tokens, hidden, generator=rng)
    topk_ids = torch.stack([torch.randperm(experts, generator=rng)[:top_k] for _ in range(tokens)])
    topk_weights = torch.rand(tokens, top_k, generator=rng)
    out = ref.grouped_moe_mxfp4(x, w1_blocks, w1_scales, w2_blocks, w2_scales, topk_ids, topk_weights)
    expected = _moe_by_hand(x, w1, w2, topk_ids, topk_weights.double())
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-4)


# -------------------------------------------------------------------------------------- attention


def _attention_by_hand(q, k, v, lengths, causal_block: bool) -> torch.Tensor:
    """Loop over (sequence, head, query): softmax over exactly the keys that query may see, in float64."""
    batch, heads, num_queries, head_dim = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, heads, num_queries, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        length = int(lengths[b])
        for h in range(heads):
            for i in range(num_queries):
                position = length - num_queries + i
                visible = position + 1 if causal_block else length
                keys, values = k[b, h // group, :visible].double(), v[b, h // group, :visible].double()
                weights = torch.softmax(keys @ q[b, h, i].double() / math.sqrt(head_dim), dim=0)
                out[b, h, i] = weights @ values
    return out


@pytest.mark.parametrize("causal_block", [True, False])
def test_decode_attention_matches_loop(rng: torch.Generator, causal_block: bool) -> None:
    q = torch.randn(3, 4, 3, 8, generator=rng)
    k = torch.randn(3, 2, 10, 8, generator=rng)
    v = torch.randn(3, 2, 10, 6, generator=rng)
    lengths = torch.tensor([3, 10, 6])
    out = ref.decode_attention(q, k, v, lengths, causal_block)
    torch.testing.assert_close(out, _attention_by_hand(q, k, v, lengths, causal_block).float())


def test_single_query_decode_ignores_causal_flag(rng: torch.Generator) -> None:
    q = torch.randn(1, 2, 1, 8, generator=rng)
    k, v = torch.randn(2, 1, 1, 6, 8, generator=rng).unbind(0)
    lengths = torch.tensor([4])
    torch.testing.assert_close(
        ref.decode_attention(q, k, v, lengths, True), ref.decode_attention(q, k, v, lengths, False)
    )
