"""int8 weight-only linears for CPU decoding (one fp32 scale per 32 weights, like llama.cpp's Q8_0).

Decoding on a CPU is bound by reading weights; int8 reads 1.125 bytes per weight instead of fp32's 4, through
the compiled kernel in kernels/cpu_gemm.py. A module swap after loading, gpt-fast style: the model code does not
change. Near lossless (relative error ~0.4% per weight), and speculative decoding stays exact with respect to
the model actually served, since the drafter's proposals are verified by the same swapped target.
"""

from __future__ import annotations

import torch
from torch import nn

from ultraspeed.kernels import cpu_gemm
from ultraspeed.models.layers import Linear


class PackedLinear(nn.Module):
    """A Linear whose weight is packed for a compiled CPU matmul (`kernel(x, packed)`, fp32 in and out)."""

    kernel = None

    def __init__(self, linear: Linear, packed, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = packed
        self.bias = linear.bias
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:     # the usual case: no conversions to dispatch
            y = self.kernel(x, self.packed)
        else:
            y = self.kernel(x.float(), self.packed).to(x.dtype)
        return y + self.bias if self.bias is not None else y


class Int8Linear(PackedLinear):
    kernel = staticmethod(cpu_gemm.int8_linear)

    def __init__(self, linear: Linear, keep_weight: bool = False) -> None:
        # The LM head's fp32 rows stay reachable for the drafter's draft-vocabulary head (shared with the
        # embedding when the model ties them, so usually free).
        super().__init__(linear, cpu_gemm.pack_int8(linear.weight.detach()), linear.weight if keep_weight else None)


def dense_linears(model: nn.Module) -> list[tuple[nn.Module, str, Linear]]:
    """(parent, name, Linear) for every CPU Linear a packed format can take (K a multiple of the group size)."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, Linear) and child.weight.device.type == "cpu"
            and child.in_features % cpu_gemm.GROUP == 0]


def use_int8_weights(model: nn.Module) -> int:
    """Swap every dense Linear (attention, dense MLP, LM head) for Int8Linear; returns how many were swapped.
    Does nothing (returns 0) where the compiled kernel is unavailable."""
    if not cpu_gemm.is_available():
        return 0
    swaps = dense_linears(model)
    for parent, name, child in swaps:
        setattr(parent, name, Int8Linear(child, keep_weight=name == "lm_head"))
    return len(swaps)


WEIGHT_FORMATS = ("auto", "fp32", "int8", "q4")
COMPILED_FORMATS = ("int8", "q4+int8")      # what apply_weight_format returns when the CPU kernels serve


def apply_weight_format(model: nn.Module, weights: str) -> str:
    """Serve `model` with dense weights as `weights` says; returns the format in effect ("checkpoint" or one of
    COMPILED_FORMATS). "auto": int8 on a CPU where the compiled kernel builds (the fastest here), else the
    checkpoint's own precision. "q4": the matrices the checkpoint ships in 4 bits stay 4-bit (quant/q4.py,
    lossless, ~45% fewer weight bytes), the rest int8."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if weights == "fp32" or (weights == "auto" and not on_cpu):
        return "checkpoint"
    from ultraspeed.quant.q4 import use_q4_weights
    four_bit = use_q4_weights(model) if weights == "q4" else 0
    if weights == "q4" and not four_bit and cpu_gemm.is_available():
        raise ValueError("--weights q4 serves a checkpoint's 4-bit matrices (a Q4_1 GGUF) as they are; this "
                         "model has none, and quantizing it to 4 bits would change it (use auto or int8)")
    if use_int8_weights(model) or four_bit:
        from ultraspeed.kernels.cpu_layer import fuse_dense_layers   # imports the model code, which imports us
        fuse_dense_layers(model)        # the glue between a layer's matmuls in one call too
        return "q4+int8" if four_bit else "int8"
    if weights != "auto":
        raise ValueError(f"--weights {weights} needs the compiled CPU kernel (a C++ compiler) and a CPU model")
    return "checkpoint"


def match_drafter_weights(drafter: nn.Module, target_format: str, target: nn.Module) -> None:
    """Serve a drafter in the same dense format as the target it drafts for (so drafting gets as cheap), its
    draft-vocabulary head included: the target LM head's fp32 rows for the draft vocabulary were the largest
    read of a CPU draft step (4,096 x 576 fp32 = 9 MB, ~40% of it); its layers fused like the target's."""
    if target_format in COMPILED_FORMATS and apply_weight_format(drafter, "int8") == "int8":
        rows = drafter.draft_head(target.lm_head.weight)
        head = Linear(rows.shape[1], rows.shape[0])
        head.weight = nn.Parameter(rows, requires_grad=False)
        drafter.served_head = Int8Linear(head)
        from ultraspeed.kernels.cpu_draft_layer import fuse_draft_layers   # imports this module
        fuse_draft_layers(drafter)
