"""MXFP4 on expert weights: which modules it applies to, and the module swaps.

Only routed-expert weights are quantized: they hold the bulk of a MoE's bytes and tolerate FP4, while attention,
router, norms, embeddings and the LM head keep their precision. A dense model has no experts; its MLP
projections (gate_up_proj, down_proj) take their place, so the default dense model can be quantized too.

Swapped-in modules keep the call signatures of the ones they replace:
- MXFP4Linear / MXFP4Experts (inference) hold packed weights. Their buffers are named `<param>_blocks` and
  `<param>_scales`, so a quantized model's state_dict *is* the gpt-oss checkpoint layout
  (`mlp.experts.gate_up_proj_blocks`, `mlp.down_proj.weight_scales`, ...) and loads back without renaming.
- FakeQuantLinear (quant/qat.py) / FakeQuantExperts (QAT) train the high-precision master weights through
  Q(W) with a straight-through gradient. They share the original Parameters, so state_dict keys do not change,
  and `quantize_experts` exports them with the very quantizer they trained through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.layers import Linear
from ultraspeed.models.moe import DenseMLP, Experts
from ultraspeed.quant.mxfp4 import BLOCK_SIZE, MXFP4Tensor, ScaleRule, check_scale_rule, dequantize_mxfp4
from ultraspeed.quant.qat import FakeQuantLinear, export_mxfp4, fake_quant_linear_weight

# -- the packed matmul ---------------------------------------------------------------------------------------


def cpu_kernel():
    """The compiled CPU MXFP4 GEMM (kernels/cpu_gemm.py) if it exists and can run on this machine, else None."""
    try:
        from ultraspeed.kernels import cpu_gemm
    except ImportError:
        return None
    return cpu_gemm if cpu_gemm.is_available() else None


def packed_linear(x: Tensor, blocks: Tensor, scales: Tensor, bias: Tensor | None = None,
                  use_kernel: bool = True) -> Tensor:
    """y = x @ W.T (+ b) for a packed W [N, K]: the compiled CPU kernel where it applies (fp32 CPU inference),
    otherwise the reference, dequantize then matmul (any device, dtype, and differentiable in x)."""
    kernel = cpu_kernel() if (use_kernel and x.device.type == "cpu" and x.dtype == torch.float32
                               and not (x.requires_grad and torch.is_grad_enabled())) else None
    if kernel is None:
        return F.linear(x, dequantize_mxfp4(blocks, scales, x.dtype), bias)
    y = kernel.mxfp4_linear(x, blocks, scales)
    return y if bias is None else y + bias


def swiglu(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """One expert, as Experts computes it: gate rows first in gate_up [2I, H], then down [H, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


# -- packed inference modules ----------------------------------------------------------------------------------


class MXFP4Linear(nn.Module):
    """A Linear whose weight [N, K] is stored packed: weight_blocks uint8 [N, K//32, 16], weight_scales [N, K//32]."""

    def __init__(self, weight: MXFP4Tensor, bias: Tensor | None = None, use_kernel: bool = True) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_blocks", weight.blocks)
        self.register_buffer("weight_scales", weight.scales)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.use_kernel = use_kernel  # False forces the reference path (bit-exact with fake-quant)

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.weight_blocks, self.weight_scales, self.bias, self.use_kernel)

    def packed(self) -> MXFP4Tensor:
        return MXFP4Tensor(self.weight_blocks, self.weight_scales, torch.float32)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class MXFP4Experts(Experts):
    """Experts with packed stacked weights, gpt-oss names: gate_up_proj_blocks [E, 2I, H//32, 16] (+ _scales)
    and down_proj_blocks [E, H, I//32, 16] (+ _scales). Routing and grouping by expert are Experts.forward's;
    only the per-expert matmuls differ."""

    def __init__(self, gate_up_proj: MXFP4Tensor, down_proj: MXFP4Tensor, use_kernel: bool = True) -> None:
        nn.Module.__init__(self)  # not Experts.__init__: it would allocate the dense weights this module replaces
        self.num_experts = gate_up_proj.shape[0]
        self.register_buffer("gate_up_proj_blocks", gate_up_proj.blocks)
        self.register_buffer("gate_up_proj_scales", gate_up_proj.scales)
        self.register_buffer("down_proj_blocks", down_proj.blocks)
        self.register_buffer("down_proj_scales", down_proj.scales)
        self.use_kernel = use_kernel

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        gate, up = packed_linear(x, self.gate_up_proj_blocks[e], self.gate_up_proj_scales[e],
                                 use_kernel=self.use_kernel).chunk(2, dim=-1)
        return packed_linear(F.silu(gate) * up, self.down_proj_blocks[e], self.down_proj_scales[e],
                             use_kernel=self.use_kernel)

    def packed(self) -> dict[str, MXFP4Tensor]:
        return {"gate_up_proj": MXFP4Tensor(self.gate_up_proj_blocks, self.gate_up_proj_scales, torch.float32),
                "down_proj": MXFP4Tensor(self.down_proj_blocks, self.down_proj_scales, torch.float32)}


# -- QAT module ------------------------------------------------------------------------------------------------


class FakeQuantExperts(Experts):
    """Experts whose forward uses Q(W) of each active expert's weights (straight-through gradient). Takes over
    the wrapped Experts' Parameters, so optimizer state and state_dict keys are the original ones. Quantizing
    one expert's slice equals slicing the quantized stack: blocks never cross experts or rows."""

    def __init__(self, experts: Experts, scale_rule: ScaleRule = "ceil") -> None:
        nn.Module.__init__(self)  # share the wrapped Parameters instead of allocating new ones
        check_scale_rule(scale_rule)
        self.num_experts = experts.num_experts
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj
        self.scale_rule = scale_rule

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        return swiglu(x, fake_quant_linear_weight(self.gate_up_proj[e], self.scale_rule),
                      fake_quant_linear_weight(self.down_proj[e], self.scale_rule))

    def export(self) -> dict[str, MXFP4Tensor]:
        return {"gate_up_proj": export_mxfp4(self.gate_up_proj, self.scale_rule),
                "down_proj": export_mxfp4(self.down_proj, self.scale_rule)}


# -- which modules ---------------------------------------------------------------------------------------------


def expert_targets(model: nn.Module) -> list[str]:
    """Qualified names of the modules MXFP4 applies to: every routed Experts of a MoE model (shared experts and
    dense layers excluded); the gate_up_proj / down_proj of every MLP of a dense model."""
    names = []
    for name, module in model.named_modules():
        if model.config.is_moe:
            if isinstance(module, Experts):
                names.append(name)
        elif isinstance(module, DenseMLP):
            names += [f"{name}.gate_up_proj", f"{name}.down_proj"]
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _check_packable(name: str, weight: Tensor) -> None:
    if weight.shape[-1] % BLOCK_SIZE:
        raise UltraSpeedError(f"{name}: input width {weight.shape[-1]} is not a multiple of {BLOCK_SIZE}, "
                              "so MXFP4 cannot pack it")


# -- swaps -----------------------------------------------------------------------------------------------------


def _fake_quant_module(model: nn.Module, name: str, scale_rule: ScaleRule) -> FakeQuantLinear | FakeQuantExperts:
    """The QAT wrapper of target `name`, wrapping it in place first if it is a plain module."""
    module = model.get_submodule(name)
    if isinstance(module, (FakeQuantLinear, FakeQuantExperts)):
        if module.scale_rule != scale_rule:
            raise UltraSpeedError(f"{name} is fake-quantized with scale rule {module.scale_rule!r}; using "
                                  f"{scale_rule!r} would not reproduce its training forward")
        return module
    if isinstance(module, (MXFP4Linear, MXFP4Experts)):
        raise UltraSpeedError(f"{name} is already packed MXFP4; QAT needs the high-precision weights "
                              "(load the checkpoint with dequantize=True)")
    if isinstance(module, Experts):
        _check_packable(name, module.gate_up_proj)
        _check_packable(name, module.down_proj)
        wrapped = FakeQuantExperts(module, scale_rule)
    else:
        _check_packable(name, module.weight)
        wrapped = FakeQuantLinear(module, scale_rule)
    _replace(model, name, wrapped)
    return wrapped


def fake_quantize_experts(model: nn.Module, scale_rule: ScaleRule = "ceil") -> list[nn.Parameter]:
    """Wrap every expert target for QAT, in place (already wrapped ones stay). Returns the master weights the
    wrappers quantize: the ones to train."""
    check_scale_rule(scale_rule)
    masters = []
    for name in expert_targets(model):
        module = _fake_quant_module(model, name, scale_rule)
        masters += [module.gate_up_proj, module.down_proj] if isinstance(module, Experts) else [module.weight]
    return masters


def quantize_experts(model: nn.Module, scale_rule: ScaleRule = "ceil") -> nn.Module:
    """Replace every expert target by its packed MXFP4 module, in place. Round-to-nearest and QAT export take
    the same road: a target is fake-quantized (a QAT target already is, and must use `scale_rule`), then packed
    by its wrapper's `export`, which runs the quantizer of the wrapper's forward. Packed targets stay as they are."""
    check_scale_rule(scale_rule)
    for name in expert_targets(model):
        if isinstance(model.get_submodule(name), (MXFP4Linear, MXFP4Experts)):
            continue
        module = _fake_quant_module(model, name, scale_rule)
        if isinstance(module, FakeQuantExperts):
            packed = MXFP4Experts(**module.export())
        else:
            packed = MXFP4Linear(module.export(), None if module.bias is None else module.bias.detach())
        _replace(model, name, packed)
    return model


def packed_placeholders(model: nn.Module, packed: set[str]) -> None:
    """Swap in empty MXFP4 modules wherever a checkpoint holds packed weights (`packed`: parameter names as in
    the model's state_dict, e.g. "layers.1.mlp.experts.gate_up_proj"), so load_state_dict can fill their
    buffers. The model may live on the meta device."""

    def empty(weight: Tensor) -> MXFP4Tensor:
        groups = weight.shape[-1] // BLOCK_SIZE
        return MXFP4Tensor(torch.empty(*weight.shape[:-1], groups, BLOCK_SIZE // 2, dtype=torch.uint8,
                                       device=weight.device),
                           torch.empty(*weight.shape[:-1], groups, dtype=torch.uint8, device=weight.device),
                           weight.dtype)

    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if type(module) is Experts and {f"{prefix}gate_up_proj", f"{prefix}down_proj"} & packed:
            _replace(model, name, MXFP4Experts(empty(module.gate_up_proj), empty(module.down_proj)))
        elif type(module) is Linear and f"{prefix}weight" in packed:
            bias = None if module.bias is None else torch.empty_like(module.bias)
            _replace(model, name, MXFP4Linear(empty(module.weight), bias))


def set_kernel(model: nn.Module, use_kernel: bool) -> None:
    """Choose the compiled CPU kernel (True, where available) or the reference dequantize-then-matmul (False)
    for every packed module of `model`."""
    for module in model.modules():
        if isinstance(module, (MXFP4Linear, MXFP4Experts)):
            module.use_kernel = use_kernel


def expert_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the expert targets: as stored now (`stored`: packed blocks + scales, or dense tensors in their
    dtype), their element count, and what they take in bf16."""
    stored = elements = 0
    for name in expert_targets(model):
        module = model.get_submodule(name)
        if isinstance(module, MXFP4Linear):
            tensors = [module.packed()]
        elif isinstance(module, MXFP4Experts):
            tensors = list(module.packed().values())
        else:
            tensors = [module.gate_up_proj, module.down_proj] if isinstance(module, Experts) else [module.weight]
        for t in tensors:
            stored += t.nbytes if isinstance(t, MXFP4Tensor) else t.numel() * t.element_size()
            elements += t.shape.numel()
    return {"stored": stored, "elements": elements, "bf16": 2 * elements}
