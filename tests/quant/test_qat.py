"""MXFP4 QAT wrapping (ultraspeed.quant.qat): training forward == exported weights, bit for bit, and the
straight-through gradient actually trains the master weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ultraspeed.quant.mxfp4 import SCALE_RULES, dequantize_mxfp4, fake_quantize_mxfp4
from ultraspeed.quant.qat import FakeQuantLinear, export_mxfp4, fake_quant_linear_weight

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]),
                                                                     b.view(INT_VIEW[b.dtype]))


def make_linear(in_features: int, out_features: int, dtype: torch.dtype, seed: int, bias: bool = True) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        # blocks at different magnitudes, plus exact and negative zeros (where a sloppy STE loses the sign)
        w = torch.randn(out_features, in_features // 32, 32, generator=g)
        w = (w * torch.exp2(torch.randint(-8, 9, w.shape[:-1] + (1,), generator=g))).flatten(-2)
        w[0, :32] = -0.0
        w[1, 5] = 0.0
        linear.weight.copy_(w)
    return linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_rule", SCALE_RULES)
def test_export_is_bit_identical_to_training_forward(dtype: torch.dtype, scale_rule: str) -> None:
    linear = make_linear(128, 48, dtype, seed=0)
    trained = fake_quant_linear_weight(linear.weight, scale_rule)
    exported = export_mxfp4(linear.weight, scale_rule)
    assert exported.blocks.shape == (48, 4, 16) and exported.scales.shape == (48, 4)  # gpt-oss layout
    assert exported.dtype == dtype
    assert same_bits(exported.dequantize(), trained.detach())
    assert same_bits(dequantize_mxfp4(exported.blocks, exported.scales, dtype), trained.detach())

    module = FakeQuantLinear(linear, scale_rule)
    assert same_bits(module.export().dequantize(), trained.detach())
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert same_bits(module(x).detach(), F.linear(x, exported.dequantize(), linear.bias).detach())


def test_wrapper_shares_parameters_and_state_dict() -> None:
    linear = make_linear(64, 8, torch.float32, seed=2)
    module = FakeQuantLinear(linear)
    assert module.weight is linear.weight and module.bias is linear.bias
    assert list(module.state_dict()) == list(linear.state_dict()) == ["weight", "bias"]
    assert (module.in_features, module.out_features, module.scale_rule) == (64, 8, "ceil")
    assert "scale_rule='ceil'" in repr(module)


def test_wrapper_without_bias_and_duck_typed_layer() -> None:
    class Plain(nn.Module):  # not an nn.Linear: only .weight [out, in] (the model's own Linear looks like this)
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 32))

    for layer in (make_linear(32, 4, torch.float32, seed=3, bias=False), Plain()):
        module = FakeQuantLinear(layer, "even")
        assert module.bias is None
        x = torch.randn(2, 32)
        assert torch.equal(module(x), x @ fake_quantize_mxfp4(layer.weight, "even").T)


def test_ste_gradient_is_the_gradient_at_the_quantized_weight() -> None:
    linear = make_linear(96, 16, torch.float32, seed=4)
    module = FakeQuantLinear(linear)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(5))
    target = torch.randn(7, 16, generator=torch.Generator().manual_seed(6))
    F.mse_loss(module(x), target).backward()

    q = fake_quant_linear_weight(linear.weight).detach().requires_grad_()
    b = linear.bias.detach().clone().requires_grad_()
    F.mse_loss(F.linear(x, q, b), target).backward()
    assert torch.equal(linear.weight.grad, q.grad)  # dL/dW = dL/dQ(W)
    assert torch.equal(linear.bias.grad, b.grad)


def test_stacked_expert_weights_quantize_per_expert() -> None:
    experts = torch.randn(4, 24, 64, generator=torch.Generator().manual_seed(7))  # [E, out, in]
    stacked = fake_quant_linear_weight(experts)
    for e in range(4):
        assert torch.equal(stacked[e], fake_quant_linear_weight(experts[e]))
    packed = export_mxfp4(experts)
    assert packed.blocks.shape == (4, 24, 2, 16) and torch.equal(packed.dequantize(), stacked)


def test_qat_beats_round_to_nearest() -> None:
    # Correlated inputs: RTN rounds every weight on its own, QAT learns to let errors cancel along the data.
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 64, generator=g)
    mix = torch.randn(64, 64, generator=g) * torch.exp2(-torch.arange(64) / 8.0)[:, None]

    def batch() -> torch.Tensor:
        return torch.randn(256, 64, generator=g) @ mix

    student = FakeQuantLinear(nn.Linear(64, 16, bias=False))
    with torch.no_grad():
        student.weight.copy_(teacher)  # start from PTQ, as recommended
    held_out = batch()

    def loss(x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student(x), x @ teacher.T)

    rtn = loss(held_out).item()
    for _ in range(60):  # plain SGD: fine here, and torch.optim costs seconds to import
        student.weight.grad = None
        loss(batch()).backward()
        with torch.no_grad():
            student.weight -= 0.01 * student.weight.grad
    assert student.weight.dtype == torch.float32 and not torch.equal(student.weight, teacher)
    assert loss(held_out).item() < 0.8 * rtn


def test_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        FakeQuantLinear(nn.Linear(40, 8))
    stacked = nn.Module()
    stacked.weight = nn.Parameter(torch.randn(2, 8, 32))
    with pytest.raises(ValueError, match="2-D"):
        FakeQuantLinear(stacked)
    with pytest.raises(ValueError, match="scale_rule"):
        FakeQuantLinear(nn.Linear(32, 8), "nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[\.\.\., out, in\]"):
        fake_quant_linear_weight(torch.randn(64))
    with pytest.raises(ValueError, match=r"\[\.\.\., out, in\]"):
        export_mxfp4(torch.randn(8, 48))
