"""Mixture-of-experts feed-forward: routing, then expert compute grouped by expert.

Tokens are sorted by the expert they were routed to, so each active expert runs one matmul over all of its
tokens (a Python loop over experts, never over tokens) — the CPU form of the grouped-GEMM the GPU kernels use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ultraspeed.config import ModelConfig
from ultraspeed.models.layers import Linear


def route_softmax(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen3-MoE: softmax over all experts, keep the top k (renormalized if asked)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def route_sigmoid_grouped(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                          normalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores; a bias (load balancing) steers only *which* experts are chosen; experts are
    picked from the `topk_group` groups whose best two biased scores sum highest. MiMo-V2-Flash routes the same way
    (usually with a single group)."""
    scores = logits.float().sigmoid()
    biased = scores + bias.float()
    num_experts = scores.shape[-1]
    grouped = biased.view(-1, n_group, num_experts // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(-1)
    keep_groups = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, keep_groups, 1.0)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, num_experts).bool()
    # -inf, not 0: biased scores can be negative, and an expert outside the kept groups must never win.
    ids = biased.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate, dtype=dtype))

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.expert_hidden(e, x), self.down_proj[e])

    def expert_hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of expert e: the input of its down projection (GPTQ calibration records it here)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, H]; weights/ids [N, k] -> [N, H] = sum over k of weight * expert(x)."""
        top_k = ids.shape[-1]
        flat_ids = ids.reshape(-1)
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of = order // top_k                       # which token each sorted (token, slot) pair belongs to
        slot_weight = weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start:start + count]
            y = self.expert_forward(e, x.index_select(0, rows)) * slot_weight[start:start + count].to(x.dtype)
            out.index_add_(0, rows, y)
            start += count
        return out


class DenseMLP(nn.Module):
    """SwiGLU feed-forward with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, dtype=dtype)
        self.down_proj = Linear(intermediate, hidden, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoE(nn.Module):
    """Router + routed experts (+ always-on shared experts for DeepSeek-V3)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.gate = Linear(config.hidden_size, config.num_experts, dtype=dtype)
        if config.router == "sigmoid":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts, dtype=torch.float32))
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size, dtype)
        self.shared_experts = (
            DenseMLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts, dtype)
            if config.num_shared_experts else None)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if c.router == "sigmoid":
            # DeepSeek/MiMo take router logits in fp32 whatever the activation dtype (the reference does too).
            logits = F.linear(x.float(), self.gate.weight.float())
            return route_sigmoid_grouped(logits, self.e_score_correction_bias, c.num_experts_per_tok, c.n_group,
                                         c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
        return route_softmax(self.gate(x), c.num_experts_per_tok, c.norm_topk_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.route(flat)
        out = self.experts(flat, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)
