"""Module swaps (ultraspeed.quant.apply): only expert weights change, packed modules compute what the dequantized
reference computes, and the QAT swap trains the original Parameters through the same quantizer."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.quant.tiny import logits, same_bits, token_ids
from ultraspeed.errors import UltraSpeedError
from ultraspeed.loader import load_model
from ultraspeed.models.layers import Linear
from ultraspeed.models.moe import Experts
from ultraspeed.quant.apply import (
    FakeQuantExperts,
    MXFP4Experts,
    MXFP4Linear,
    cpu_kernel,
    expert_targets,
    expert_weight_bytes,
    fake_quantize_experts,
    packed_linear,
    quantize_experts,
    set_kernel,
)
from ultraspeed.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from ultraspeed.quant.qat import FakeQuantLinear, fake_quant_linear_weight


def expert_param_names(model) -> set[str]:
    return {f"{t}.{leaf}" for t in expert_targets(model) for leaf in
            (("gate_up_proj", "down_proj") if isinstance(model.get_submodule(t), Experts) else ("weight",))}


def with_dequantized_experts(model, scale_rule: str = "ceil"):
    """The dense reference: the same model with every expert weight replaced by dequantize(quantize(W))."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in expert_param_names(ref):
            p = ref.get_parameter(name)
            p.copy_(dequantize_mxfp4(*quantize_mxfp4(p, scale_rule), p.dtype))
    return ref


@pytest.mark.parametrize("arch", ["qwen3_moe", "llama"])
def test_swap_touches_only_expert_weights(tiny_dir, arch):
    model = load_model(tiny_dir(arch)).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected_targets = (
        # qwen3_moe: layer 0 is a dense MLP layer (mlp_only_layers) and stays unquantized.
        ["layers.1.mlp.experts", "layers.2.mlp.experts"] if arch == "qwen3_moe" else
        [f"layers.{i}.mlp.{p}" for i in range(3) for p in ("gate_up_proj", "down_proj")])
    assert expert_targets(model) == expected_targets
    experts = expert_param_names(model)
    ref = with_dequantized_experts(model)

    quantize_experts(model)
    after = model.state_dict()
    untouched = {k for k in before if k not in experts}
    assert untouched <= set(after)
    assert all(same_bits(after[k], before[k]) for k in untouched)
    packed = set(after) - untouched
    assert packed == {f"{n}_{part}" for n in experts for part in ("blocks", "scales")}
    assert all(after[k].dtype == torch.uint8 for k in packed)
    kinds = {type(model.get_submodule(t)) for t in expected_targets}
    assert kinds == ({MXFP4Experts} if arch == "qwen3_moe" else {MXFP4Linear})
    assert isinstance(model.layers[0].self_attn.qkv_proj, Linear) and isinstance(model.lm_head, Linear)

    ids = token_ids()
    set_kernel(model, False)   # the reference path: bit-exact with the dense model of dequantized weights
    assert torch.equal(logits(model, ids), logits(ref, ids))
    set_kernel(model, True)    # the compiled kernel where available: same math, fp32 rounding differences
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_expert_bytes_are_4_25_over_16_of_bf16(tiny_dir):
    model = load_model(tiny_dir("qwen3_moe")).model
    dense = expert_weight_bytes(model)
    assert dense["stored"] == 4 * dense["elements"] and dense["bf16"] == 2 * dense["elements"]
    packed = expert_weight_bytes(quantize_experts(model))
    assert packed["elements"] == dense["elements"]
    assert packed["stored"] * 64 == dense["bf16"] * 17  # 4.25 / 16 = 17 / 64, exactly


@pytest.mark.parametrize("arch", ["qwen3_moe", "llama"])
@pytest.mark.parametrize("scale_rule", ["ceil", "even"])
def test_fake_quant_swap_matches_packed_model(tiny_dir, arch, scale_rule):
    model = load_model(tiny_dir(arch)).model
    keys = list(model.state_dict())
    packed = quantize_experts(copy.deepcopy(model), scale_rule)
    set_kernel(packed, False)
    originals = [model.get_parameter(n) for n in sorted(expert_param_names(model))]

    masters = fake_quantize_experts(model, scale_rule)
    assert {id(p) for p in masters} == {id(p) for p in originals}  # the wrappers train the original Parameters
    assert list(model.state_dict()) == keys
    assert all(isinstance(model.get_submodule(t), (FakeQuantExperts, FakeQuantLinear)) for t in expert_targets(model))
    ids = token_ids(1)
    assert torch.equal(logits(model, ids), logits(packed, ids))
    # Wrapping twice is a no-op; exporting with another rule than the trained one is refused.
    assert len(fake_quantize_experts(model, scale_rule)) == len(masters)
    with pytest.raises(UltraSpeedError, match="fake-quantized with scale rule"):
        quantize_experts(model, "floor")


def test_packed_model_cannot_be_trained_and_repacking_is_a_no_op(tiny_dir):
    model = quantize_experts(load_model(tiny_dir("qwen3_moe")).model)
    experts = model.layers[1].mlp.experts
    assert quantize_experts(model).layers[1].mlp.experts is experts
    with pytest.raises(UltraSpeedError, match="already packed MXFP4; QAT needs the high-precision weights"):
        fake_quantize_experts(model)


def test_fake_quant_experts_gradient_is_straight_through(tiny_dir):
    model = load_model(tiny_dir("qwen3_moe")).model
    masters = fake_quantize_experts(model)
    for p in masters:
        p.requires_grad_(True)
    experts = model.layers[1].mlp.experts
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    weights, ids = torch.full((5, 2), 0.5), torch.tensor([[0, 1], [1, 2], [0, 5], [3, 1], [5, 0]])
    experts(x, weights, ids).square().sum().backward()
    # Reference: the dense Experts math on Q(W) as plain leaves.
    q_gate_up = fake_quant_linear_weight(experts.gate_up_proj).detach().requires_grad_()
    q_down = fake_quant_linear_weight(experts.down_proj).detach().requires_grad_()
    ref = Experts(6, 64, 32, torch.float32)
    ref.gate_up_proj, ref.down_proj = torch.nn.Parameter(q_gate_up), torch.nn.Parameter(q_down)
    ref(x, weights, ids).square().sum().backward()
    assert torch.equal(experts.gate_up_proj.grad, ref.gate_up_proj.grad)
    assert torch.equal(experts.down_proj.grad, ref.down_proj.grad)
    assert experts.gate_up_proj.grad[4].abs().sum() == 0  # expert 4 got no tokens, so no gradient


def test_packed_linear_kernel_matches_reference():
    if cpu_kernel() is None:
        pytest.skip("compiled CPU MXFP4 kernel not available here")
    g = torch.Generator().manual_seed(3)
    blocks, scales = quantize_mxfp4(torch.randn(96, 128, generator=g))
    for rows in (1, 7):
        x = torch.randn(rows, 128, generator=g)
        torch.testing.assert_close(packed_linear(x, blocks, scales),
                                   packed_linear(x, blocks, scales, use_kernel=False), rtol=1e-5, atol=1e-5)


def test_unpackable_width_is_a_clear_error(tiny_dir):
    model = load_model(tiny_dir("llama")).model
    mlp = model.layers[0].mlp
    narrow = Linear(40, 64)
    narrow.weight = torch.nn.Parameter(torch.randn(64, 40), requires_grad=False)
    mlp.down_proj = narrow
    with pytest.raises(UltraSpeedError, match="layers.0.mlp.down_proj: input width 40"):
        quantize_experts(model)
