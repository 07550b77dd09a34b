"""A whole dense decoder layer per C++ call, for CPU decode steps (csrc/cpu_gemm.cpp: dense_layer).

With int8 weights, a one-token step of the default model spends about as long dispatching the ~140 small PyTorch
ops between each layer's four matmuls (norms, rope, KV write, attention, SwiGLU, residuals: views and
allocations included) as in the matmuls. `FusedDenseLayer` is a DecoderLayer (same submodules, so everything
that reads them still works) whose steps of up to MAX_TOKENS new tokens (decode, speculative verification) run
as one call; prefill chunks, the static GPU runtime and anything else go through the PyTorch code it inherits,
which stays the reference (tests/kernels/test_cpu_layer.py compares the two).

Supported: Llama / Mistral / Qwen2-without-bias / Qwen3 layers (rotate-half rope over the whole head, optional
QK-norm, optional sliding window, no sinks, no value scale), a dense SwiGLU MLP, the four projections int8
(quant/int8.py), all four 4-bit (quant/q4.py), or int8 attention with an MXFP4 MLP (quant/apply.py), without
bias, fp32 activations and KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from ultraspeed.kernels import cpu_gemm
from ultraspeed.models.decoder import Attention, Decoder, DecoderLayer, StepContext
from ultraspeed.models.moe import DenseMLP
from ultraspeed.quant.apply import MXFP4Linear
from ultraspeed.quant.int8 import Int8Linear
from ultraspeed.quant.q4 import Q4Linear

MAX_TOKENS = 16      # longer steps (prefill chunks) are compute-bound: torch's threaded attention is faster there


def supports(layer: nn.Module, model: Decoder) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(layer) is not DecoderLayer or type(attn) is not Attention or type(mlp) is not DenseMLP:
        return False
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    cos, _ = model.rope_tables[attn.layer_type]
    formats = (_format(attn.qkv_proj), _format(attn.o_proj)), (_format(mlp.gate_up_proj), _format(mlp.down_proj))
    one_each = formats[0][0] == formats[0][1] and formats[1][0] == formats[1][1]
    return (one_each and (formats[0][0], formats[1][0]) in cpu_gemm.LAYER_FORMATS
            and all(m.bias is None for m in linears) and attn.sinks is None
            and attn.value_scale == 1.0 and attn.v_head_dim == attn.head_dim and cos.shape[-1] == attn.head_dim
            and model.dtype == torch.float32)


def _format(linear: nn.Module) -> str | None:
    if isinstance(linear, Int8Linear):
        return "int8"
    if isinstance(linear, Q4Linear):
        return "q4"
    if (isinstance(linear, MXFP4Linear) and linear.use_kernel and linear.weight_blocks.is_cpu
            and linear.weight_blocks.is_contiguous() and linear.weight_scales.is_contiguous()):
        return "mxfp4"
    return None


def _packed(linear: nn.Module):
    return (linear.weight_blocks, linear.weight_scales) if isinstance(linear, MXFP4Linear) else linear.packed


class FusedDenseLayer(DecoderLayer):
    def __init__(self, layer: DecoderLayer, model: Decoder) -> None:
        nn.Module.__init__(self)
        self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp
        attn, mlp, c = layer.self_attn, layer.mlp, model.config
        # Held here so that the pointers below stay valid: the weights and the rope rows of this layer type.
        self._rope = model.rope_tables[attn.layer_type]
        window = c.sliding_window if attn.layer_type == "sliding_attention" and c.sliding_window else 0
        norms = [self.input_layernorm.weight, self.post_attention_layernorm.weight]
        qk_norms = [attn.q_norm.weight, attn.k_norm.weight] if attn.q_norm is not None else []
        self._tensors = norms + qk_norms + list(self._rope)
        packed = [_packed(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        self._shape = (c.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                       mlp.down_proj.in_features)
        self._window = window
        # The format was decided by `supports` (through _format); the packed matrices only give their pointers.
        self._format = cpu_gemm.LAYER_FORMATS[_format(attn.qkv_proj), _format(mlp.gate_up_proj)]
        self._pointers = ([t.data_ptr() for t in norms] + ([t.data_ptr() for t in qk_norms] or [0, 0])
                          + [t.data_ptr() for t in self._rope]
                          + [p for w in packed for p in cpu_gemm.weight_pointers(w)[1:]])
        self._eps, self._scale = float(self.input_layernorm.eps), float(attn.scale)
        if self.input_layernorm.eps != self.post_attention_layernorm.eps:
            raise ValueError("the fused layer assumes one RMSNorm epsilon per layer")

    def forward(self, x: torch.Tensor, step: StepContext, cache, layer: int) -> torch.Tensor:
        keys, values = cache.keys[layer], cache.values[layer]
        if (x.shape[1] > MAX_TOKENS or step.static or x.dtype != torch.float32 or x.device.type != "cpu"
                or keys.dtype != torch.float32 or not keys.is_contiguous() or not values.is_contiguous()
                # parameters re-allocated since the swap (a dtype or device round trip re-allocates them all; the
                # first norm weight stands for them): the pointers are stale, the PyTorch path reads the new ones
                or self.input_layernorm.weight.data_ptr() != self._pointers[0]):
            return super().forward(x, step, cache, layer)
        B, T, _ = x.shape
        # In place: x is the previous layer's output or the embeddings, which nothing else holds (Decoder.forward
        # copies the outputs it captures).
        out = x if x.is_contiguous() else x.contiguous()
        row = step.first_row * keys.stride(0) * keys.element_size()    # the step's rows start here
        cpu_gemm.dense_layer(out, step.starts, B, T, *self._shape, keys.shape[2], self._window, self._pointers,
                             keys.data_ptr() + row, values.data_ptr() + row, self._eps, self._scale,
                             weight_format=self._format, end=step.span)
        return out


def fuse_dense_layers(model: nn.Module) -> int:
    """Swap every supported DecoderLayer of a Decoder for a FusedDenseLayer (after int8 weights are in place);
    returns how many were swapped. Does nothing where the compiled kernels are unavailable."""
    if not isinstance(model, Decoder) or not cpu_gemm.is_available():
        return 0
    swapped = 0
    for i, layer in enumerate(model.layers):
        if supports(layer, model):
            model.layers[i] = FusedDenseLayer(layer, model)
            swapped += 1
    return swapped
