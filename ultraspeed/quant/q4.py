"""4-bit weights kept 4-bit: a GGUF checkpoint's Q4_1 matrices served in Q4_1 (kernels/cpu_gemm.py: q4_linear).

The loader decodes every tensor to fp32, and int8 re-packing then reads 1.125 bytes per weight for matrices that
carry only 4 bits of information each. Where a matrix's every group of 32 is exactly d * code + m (codes 0..15,
fp16 d and m), it is packed back into that form losslessly: 0.625 bytes per weight, the same numbers as the
checkpoint, so a memory-bound decode step reads ~45% fewer bytes. Matrices that are not 4-bit (an fp16 or Q8_0
checkpoint) are left alone: quantizing them to 4 bits would change the model, which is the MXFP4 path's job.
"""

from __future__ import annotations

from torch import nn

from ultraspeed.kernels import cpu_gemm
from ultraspeed.quant.int8 import PackedLinear, dense_linears


class Q4Linear(PackedLinear):
    kernel = staticmethod(cpu_gemm.q4_linear)


def use_q4_weights(model: nn.Module) -> int:
    """Swap every dense Linear whose weights are exactly 4-bit for a Q4Linear (the LM head excepted: the drafter
    reads its fp32 rows); returns how many were swapped. Nothing where the compiled kernel is unavailable."""
    if not cpu_gemm.is_available():
        return 0
    swapped = 0
    for parent, name, child in dense_linears(model):
        packed = cpu_gemm.pack_q4(child.weight) if name != "lm_head" else None
        if packed is not None:
            setattr(parent, name, Q4Linear(child, packed))
            swapped += 1
    return swapped
