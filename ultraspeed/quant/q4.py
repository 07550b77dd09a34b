"""4-bit weights kept 4-bit: a GGUF checkpoint's Q4_1 matrices served in Q4_1 (kernels/cpu_gemm.py: q4_linear).

The loader decodes every tensor to fp32, and int8 re-packing then reads 1.125 bytes per weight for matrices that
carry only 4 bits of information each. Where a matrix's every group of 32 is exactly d * code + m (codes 0..15,
fp16 d and m), it is packed back into that form losslessly: 0.625 bytes per weight, the same numbers as the
checkpoint, so a memory-bound decode step reads ~45% fewer bytes. Matrices that are not 4-bit (an fp16 or Q8_0
checkpoint) are left alone: quantizing them to 4 bits would change the model, which is the MXFP4 path's job.
"""

from __future__ import annotations

import torch
from torch import nn

from ultraspeed.kernels import cpu_gemm
from ultraspeed.models.layers import Linear


class Q4Linear(nn.Module):
    def __init__(self, linear: Linear, packed: cpu_gemm.PackedQ4) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = packed
        self.bias = linear.bias
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            y = cpu_gemm.q4_linear(x, self.packed)
        else:
            y = cpu_gemm.q4_linear(x.float(), self.packed).to(x.dtype)
        return y + self.bias if self.bias is not None else y


def use_q4_weights(model: nn.Module) -> int:
    """Swap every dense Linear whose weights are exactly 4-bit for a Q4Linear (the LM head excepted: the drafter
    reads its fp32 rows); returns how many were swapped. Nothing where the compiled kernel is unavailable."""
    if not cpu_gemm.is_available():
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, Linear) and child.weight.device.type == "cpu" and name != "lm_head"
             and child.in_features % cpu_gemm.GROUP == 0]
    swapped = 0
    for parent, name, child in swaps:
        packed = cpu_gemm.pack_q4(child.weight)
        if packed is not None:
            setattr(parent, name, Q4Linear(child, packed))
            swapped += 1
    return swapped
