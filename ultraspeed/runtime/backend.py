"""Which implementation each op of the static runtime uses.

`torch`  : the model's own PyTorch ops (layers.rms_norm, silu(gate) * up, rope.apply_rope, SDPA over a mask,
           per-expert matmuls). Bit for bit what the dynamic `Decoder.forward` computes; the CPU default, so the
           CPU path is unchanged.
`triton` : the Triton kernels of ultraspeed/kernels: fused residual add + RMSNorm, SwiGLU, RoPE, MXFP4 matmul
           (packed dense linears), grouped MXFP4 MoE (fed by a static-shape `moe_align`), decode attention (reads
           only each row's valid keys, no mask). The CUDA default. It runs on the CPU only under
           TRITON_INTERPRET=1, which the tests use to check it against the torch backend.

Every op takes and returns tensors of static shape and reads nothing back to the host, so a step built from
them can be captured as a CUDA graph. Ops a backend cannot do (sliding windows, sinks, MLA, dense bf16 experts)
fall back to the torch implementation.

Choice: `choose_backend(device)`; the environment variable ULTRASPEED_BACKEND=torch|triton|auto overrides.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ultraspeed.errors import UltraSpeedError
from ultraspeed.models import layers as model_layers
from ultraspeed.models.rope import apply_rope as torch_apply_rope

BACKENDS = ("torch", "triton")


class TorchBackend:
    """The reference path: exactly the ops the model modules use."""

    name = "torch"

    def needs_mask(self, window: int | None, sinks: torch.Tensor | None, plain_attention: bool) -> bool:
        """Whether `attention` for such a layer reads the boolean mask (else the mask need not be built)."""
        return True

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return model_layers.rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(residual + x), residual + x): the unfused `x = x + f(x); h = norm(x)` of a decoder layer."""
        new_residual = residual + x
        return model_layers.rms_norm(new_residual, weight, eps), new_residual

    def silu_and_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D], cos/sin [B, 1, T, R] (each row at its own positions)."""
        return torch_apply_rope(x, cos, sin)

    def linear(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                  ends: torch.Tensor, scale: float, sinks: torch.Tensor | None, causal_block: bool) -> torch.Tensor:
        """q [B, Hq, T, D] against the whole static cache keys/values [B, Hkv, S, D*]. `mask` [B, 1, T, S] says what
        each query sees; `ends` [B] (device) is each row's valid length including the T new tokens, the query
        block being the last T of them (`causal_block`: causal inside the block, else bidirectional)."""
        return model_layers.attend(q, keys, values, mask, scale, sinks)

    def experts(self, module: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
        """Routed experts without data-dependent shapes: every expert runs over every row and is weighted by the
        row's routing weight for it (zero if not routed). Experts are added in ascending order, as the dynamic
        `Experts.forward` does, so each row gets the same sum. Costs E/k times the routed compute: a fallback."""
        combine = torch.zeros(x.shape[0], module.num_experts, dtype=weights.dtype, device=x.device)
        combine.scatter_(1, ids, weights)
        combine = combine.to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(module.num_experts):
            out = out + module.expert_forward(e, x) * combine[:, e:e + 1]
        return out


class TritonBackend(TorchBackend):
    """Triton kernels where one applies, the torch ops elsewhere."""

    name = "triton"

    def __init__(self) -> None:
        from ultraspeed.kernels import (triton_activation, triton_attention, triton_moe, triton_mxfp4, triton_norm,
                                        triton_rope)
        from ultraspeed.kernels.triton_compat import require_triton
        from ultraspeed.quant.apply import MXFP4Experts, MXFP4Linear
        require_triton()
        self._norm, self._act, self._rope = triton_norm, triton_activation, triton_rope
        self._attention, self._moe, self._mxfp4 = triton_attention, triton_moe, triton_mxfp4
        self._mxfp4_linear, self._mxfp4_experts = MXFP4Linear, MXFP4Experts

    def needs_mask(self, window: int | None, sinks: torch.Tensor | None, plain_attention: bool) -> bool:
        return not (plain_attention and window is None and sinks is None)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._norm.rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._norm.add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self._act.silu_and_mul(gate, up)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # The kernel takes one cos/sin row per token of x [..., T, D] (row index % T); rows of a decode batch sit
        # at different positions, so lay x out as [H, B*T, D] and pass the B*T cos/sin rows.
        b, h, t, d = x.shape
        rot = cos.shape[-1]
        xt = x.transpose(0, 1).reshape(h, b * t, d)
        out = self._rope.apply_rope(xt, cos.reshape(b * t, rot), sin.reshape(b * t, rot))
        return out.view(h, b, t, d).transpose(0, 1)

    def linear(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, self._mxfp4_linear):
            y = self._mxfp4.mxfp4_matmul(x.reshape(-1, x.shape[-1]), module.weight_blocks, module.weight_scales)
            y = y.view(*x.shape[:-1], y.shape[-1])
            return y if module.bias is None else y + module.bias
        return module(x)

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                  ends: torch.Tensor, scale: float, sinks: torch.Tensor | None, causal_block: bool) -> torch.Tensor:
        if mask is not None:          # a window or sinks: the kernel has neither
            return super().attention(q, keys, values, mask, ends, scale, sinks, causal_block)
        return self._attention.decode_attention(q, keys, values, ends, causal_block, scale)

    def experts(self, module: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(module, self._mxfp4_experts):
            return super().experts(module, x, weights, ids)
        return grouped_moe_mxfp4_static(self._moe, self._act, x, module.gate_up_proj_blocks,
                                        module.gate_up_proj_scales, module.down_proj_blocks, module.down_proj_scales,
                                        ids, weights)


# ------------------------------------------------------------------------------------------- static MoE align


def padded_slots_bound(num_slots: int, num_experts: int, block_m: int) -> int:
    """Most rows `moe_align` can produce: each of the min(E, slots) experts that get a slot pads by < block_m."""
    bound = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return (bound + block_m - 1) // block_m * block_m


def static_moe_align(topk_ids: torch.Tensor, num_experts: int,
                     block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`reference.moe_align` with shapes that do not depend on the routing (no host sync).

    The id buffers have `padded_slots_bound` rows (and that / block_m tiles); the first num_post_padded entries
    equal moe_align's, the rest hold the sentinel (sorted ids) or the last expert (tile experts), and the grouped
    kernel skips tiles at or past num_post_padded, which stays on the device.
    """
    flat = topk_ids.reshape(-1).long()
    num_slots = flat.numel()
    device = flat.device
    # One-hot [slots, E] instead of a sort: a slot's rank among its expert's slots (in slot order, as the stable
    # sort of moe_align gives) is a running count. Small at decode sizes, and plain elementwise kernels.
    one_hot = (flat.view(-1, 1) == torch.arange(num_experts, device=device).view(1, -1)).long()
    counts = one_hot.sum(0)
    rank = (one_hot.cumsum(0) - 1).gather(1, flat.view(-1, 1)).view(-1)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    total = padded_slots_bound(num_slots, num_experts, block_m)
    sorted_ids = torch.full((total,), num_slots, dtype=torch.int32, device=device)
    slot_ids = torch.arange(num_slots, device=device)
    sorted_ids.scatter_(0, padded_start[flat] + rank, slot_ids.to(torch.int32))
    # Tile i belongs to the expert whose padded range holds row i*block_m: the number of ranges ending at or before it.
    tile_start = torch.arange(0, total, block_m, device=device)
    expert_ids = (padded_end.view(1, -1) <= tile_start.view(-1, 1)).sum(1).clamp_(max=num_experts - 1)
    expert_ids = expert_ids.to(torch.int32)
    num_post_padded = padded_end[-1:].to(torch.int32)
    return sorted_ids, expert_ids, num_post_padded


def grouped_moe_mxfp4_static(triton_moe, triton_activation, x: torch.Tensor, w1_blocks: torch.Tensor,
                             w1_scales: torch.Tensor, w2_blocks: torch.Tensor, w2_scales: torch.Tensor,
                             topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """`triton_moe.grouped_moe_mxfp4` with `static_moe_align`: same kernels, capturable."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    intermediate = w2_blocks.shape[2] * 32
    num_slots = num_tokens * top_k
    sorted_ids, expert_ids, num_post_padded = static_moe_align(topk_ids, w1_blocks.shape[0], triton_moe._BLOCK_M)
    gate_up = triton_moe.grouped_mxfp4_matmul(x, w1_blocks, w1_scales, sorted_ids, expert_ids, num_post_padded,
                                              num_slots, rows_per_a_row=top_k)
    act = triton_activation.silu_and_mul(gate_up[:, :intermediate], gate_up[:, intermediate:])
    down = triton_moe.grouped_mxfp4_matmul(act, w2_blocks, w2_scales, sorted_ids, expert_ids, num_post_padded,
                                           num_slots, rows_per_a_row=1,
                                           slot_weights=topk_weights.reshape(-1).float().contiguous())
    return triton_moe.moe_sum(down.view(num_tokens, top_k, hidden))


# ---------------------------------------------------------------------------------------------------- choice


def choose_backend(device: torch.device | str, name: str | None = None) -> TorchBackend:
    """`name` (or $ULTRASPEED_BACKEND, default "auto"): auto = triton on CUDA when Triton is installed and not in
    interpreter mode (TRITON_INTERPRET=1, slow and not capturable), else torch."""
    device = torch.device(device)
    name = (name or os.environ.get("ULTRASPEED_BACKEND") or "auto").lower()
    if name == "auto":
        from ultraspeed.kernels.triton_compat import HAS_TRITON
        interpreting = os.environ.get("TRITON_INTERPRET") == "1"
        name = "triton" if device.type == "cuda" and HAS_TRITON and not interpreting else "torch"
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UltraSpeedError(f"the triton backend needs a CUDA device (got {device.type}); on the CPU it runs "
                                  "only under TRITON_INTERPRET=1, which is for tests")
        return TritonBackend()
    raise UltraSpeedError(f"unknown backend {name!r}; expected one of: auto, {', '.join(BACKENDS)}")
