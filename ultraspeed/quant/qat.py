"""MXFP4 quantization-aware training for expert weights: fake-quantize in the forward pass, train the
high-precision master weights through a straight-through estimator, export with the very same quantizer.

Only routed-expert weights should be wrapped; router, attention, embeddings and lm_head stay in high precision
so they can adapt to the FP4 experts. A linear weight is [..., out, in] (stacked experts add a leading E dim)
and y = x @ W.T reduces over `in`, so the 32-element blocks run along the last dim. Weights stored
transposed ([..., in, out]) must be transposed before these calls.

Export must reproduce training's Q() exactly (scale rule and tie rule): `export_mxfp4(w, rule).dequantize()`
is bit-for-bit the weight `fake_quant_linear_weight(w, rule)` that the forward pass used.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ultraspeed.quant.mxfp4 import BLOCK_SIZE, MXFP4Tensor, ScaleRule, check_scale_rule, fake_quantize_mxfp4


def _check_linear_weight(weight: Tensor) -> None:
    if weight.ndim < 2 or weight.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"an MXFP4 linear weight must be [..., out, in] with in a multiple of {BLOCK_SIZE}, "
            f"got shape {tuple(weight.shape)}"
        )


def fake_quant_linear_weight(weight: Tensor, scale_rule: ScaleRule = "ceil") -> Tensor:
    """Q(W) for a linear weight [..., out, in], blocks along `in`; gradients pass straight through to W."""
    _check_linear_weight(weight)
    return fake_quantize_mxfp4(weight, scale_rule)


def export_mxfp4(weight: Tensor, scale_rule: ScaleRule = "ceil") -> MXFP4Tensor:
    """Pack a trained linear weight [..., out, in] into gpt-oss MXFP4 ([..., out, in//32, 16] + scales),
    using the quantizer `fake_quant_linear_weight` trained through; it decodes to the weight's dtype."""
    _check_linear_weight(weight)
    return MXFP4Tensor.quantize(weight.detach(), scale_rule)


class FakeQuantLinear(nn.Module):
    """A linear layer whose forward uses Q(W) in place of W.

    It takes over the wrapped module's own `weight` and `bias` Parameters (shared, not copied), so optimizer
    state and state_dict keys are those of the original layer and a QAT checkpoint loads into either.
    """

    def __init__(self, linear: nn.Module, scale_rule: ScaleRule = "ceil") -> None:
        super().__init__()
        check_scale_rule(scale_rule)
        _check_linear_weight(linear.weight)
        if linear.weight.ndim != 2:
            raise ValueError(f"FakeQuantLinear wraps a 2-D weight, got shape {tuple(linear.weight.shape)}")
        self.weight = linear.weight
        self.register_parameter("bias", getattr(linear, "bias", None))
        self.scale_rule = scale_rule
        self.out_features, self.in_features = linear.weight.shape

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, fake_quant_linear_weight(self.weight, self.scale_rule), self.bias)

    def export(self) -> MXFP4Tensor:
        return export_mxfp4(self.weight, self.scale_rule)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scale_rule={self.scale_rule!r}"
        )
