"""The DFlash drafter's layers, one C++ call each, for CPU drafting (csrc/cpu_gemm.cpp: dense_layer, non-causal).

A draft layer is a decoder layer whose queries are the block (anchor + mask slots) and whose keys are the
committed context's, already in the draft cache (engine/speculative.append_context), followed by the block's
own, which the block sees bidirectionally (or causally, as the drafter's config says). That is what dense_layer
computes when it writes the block's keys and values into the draft cache right after each row's context
(positions start..start+B-1, past the row's length: the cache's contract already treats them as stale, and the
next append_context overwrites them) and lets every token of the step see all of the step's keys. So each row
attends exactly its own context, with no padding to the longest row and no mask tensor, and a 2-layer draft of a
block of 8 becomes 2 calls instead of ~150 small ops.

Built by quant/int8.match_drafter_weights once the drafter's linears are int8: q/k/v and gate/up are concatenated
into one matrix each (int8 scales are per output row and 32 inputs, so concatenating rows changes no number).
The PyTorch layers stay the reference (tests/kernels/test_cpu_draft_layer.py) and the path for anything else
(GPU, other dtypes, training).
"""

from __future__ import annotations

import torch

from ultraspeed.kernels import cpu_gemm
from ultraspeed.quant.int8 import Int8Linear


def _concat(*linears: Int8Linear) -> cpu_gemm.PackedInt8:
    return cpu_gemm.PackedInt8(torch.cat([m.packed.qweight for m in linears]).contiguous(),
                               torch.cat([m.packed.scales for m in linears]).contiguous())


class FusedDraftLayers:
    """Runs a drafter's layers over a block: __call__(x, draft_cache, starts) -> the last layer's output."""

    def __init__(self, drafter) -> None:
        c = drafter.config
        self._shape = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size)
        self._window, self._causal = c.window or 0, c.causal_in_block
        self._eps, self._scale = float(c.rms_eps), float(c.head_dim ** -0.5)
        self._rope = (drafter.rope_cos.contiguous(), drafter.rope_sin.contiguous())
        self._packed, self._pointers = [], []       # the packed matrices are held here so the pointers stay valid
        for layer in drafter.layers:
            packed = [_concat(layer.q_proj, layer.k_proj, layer.v_proj), layer.o_proj.packed,
                      _concat(layer.gate_proj, layer.up_proj), layer.down_proj.packed]
            self._packed.append(packed)
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                     layer.q_norm.weight, layer.k_norm.weight]
            self._pointers.append([t.data_ptr() for t in norms] + [t.data_ptr() for t in self._rope]
                                  + [p for w in packed for p in cpu_gemm.weight_pointers(w)[1:]])
        self._norm_pointers = [p[0] for p in self._pointers]

    @staticmethod
    def supports(drafter) -> bool:
        linears = [getattr(layer, name) for layer in drafter.layers
                   for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
        c = drafter.config
        return (cpu_gemm.is_available() and all(isinstance(m, Int8Linear) and m.bias is None for m in linears)
                and drafter.mask_embedding.dtype == torch.float32 and drafter.mask_embedding.device.type == "cpu"
                and drafter.rope_cos.shape[-1] == c.head_dim)

    def accepts(self, drafter, x: torch.Tensor, draft_cache, block: int) -> bool:
        """Whether this call can take the fused path (else the PyTorch layers run): a CPU fp32 block, a
        contiguous fp32 draft cache with room for the block, positions within the rope table, and parameters
        still where they were when built (a dtype or device round trip re-allocates them)."""
        keys = draft_cache.keys[0]
        end = int(draft_cache.lengths[:x.shape[0]].max()) + block
        return (x.dtype == torch.float32 and x.device.type == "cpu" and keys.dtype == torch.float32
                and all(k.is_contiguous() and v.is_contiguous() for k, v in zip(draft_cache.keys, draft_cache.values))
                and end <= keys.shape[2] and end <= self._rope[0].shape[0]
                and [layer.input_layernorm.weight.data_ptr() for layer in drafter.layers] == self._norm_pointers)

    def __call__(self, x: torch.Tensor, draft_cache, starts: torch.Tensor) -> torch.Tensor:
        """x [b, T, H]: the block's embeddings for rows 0..b-1, at positions starts[row] + 0..T-1."""
        b, T, _ = x.shape
        out = torch.clone(x, memory_format=torch.contiguous_format)
        starts = starts.to(torch.int64).contiguous()
        for layer, pointers in enumerate(self._pointers):
            keys, values = draft_cache.keys[layer], draft_cache.values[layer]
            cpu_gemm.dense_layer(out, starts, b, T, *self._shape, keys.shape[2], self._window, pointers,
                                 keys.data_ptr(), values.data_ptr(), self._eps, self._scale, causal=self._causal)
        return out


def fuse_draft_layers(drafter) -> bool:
    """Give a drafter with int8 linears its fused CPU layers (drafter.fused_layers); False where unsupported."""
    if not FusedDraftLayers.supports(drafter):
        return False
    drafter.fused_layers = FusedDraftLayers(drafter)
    return True
