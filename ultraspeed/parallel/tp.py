"""Tensor parallelism as weight surgery: each rank keeps a slice of a module's weights, so that summing the
module's outputs over ranks gives the unsliced output (Megatron's column-parallel -> row-parallel pairs).

    attention : qkv_proj column-parallel by heads (rank r keeps query heads r*Hq/N.. and the KV heads they read),
                o_proj row-parallel (the matching input columns); the KV cache then holds only the local heads.
    SwiGLU MLP: gate_up_proj column-parallel (the same intermediate rows of its gate half and of its up half, so
                silu(gate) * up stays element-aligned), down_proj row-parallel. Dense or MXFP4-packed alike.

Only the slicing lives here; where the partial outputs are summed (an all-reduce) is decided in plan.py. Every
function takes the rank and world size as plain ints, so the arithmetic can be checked in one process.
"""

from __future__ import annotations

import torch
from torch import nn

from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.decoder import Attention
from ultraspeed.parallel.slicing import keep, num_rows


def shard(n: int, rank: int, world: int, what: str) -> torch.Tensor:
    """Indices of rank's contiguous 1/world share of n things."""
    if n % world:
        raise UltraSpeedError(f"{what} ({n}) do not split evenly over {world} ranks")
    size = n // world
    return torch.arange(rank * size, (rank + 1) * size)


def head_rows(heads: torch.Tensor, dim: int, offset: int = 0) -> torch.Tensor:
    """Rows (or columns) of a [heads * dim] projection that belong to these heads."""
    return (offset + heads.view(-1, 1) * dim + torch.arange(dim).view(1, -1)).reshape(-1)


def drop_bias_unless(linear: nn.Module, keep_it: bool) -> None:
    # A row-parallel layer's bias must enter the sum over ranks once: rank 0 keeps it.
    if not keep_it and getattr(linear, "bias", None) is not None:
        linear.bias = None


def shard_attention(attn: nn.Module, rank: int, world: int) -> None:
    if not isinstance(attn, Attention):
        raise UltraSpeedError(f"tensor parallelism for {type(attn).__name__} is not implemented; "
                              "use --ep alone (attention replicated) for this model")
    hq, hkv = attn.num_heads, attn.num_kv_heads
    if hkv % world and world % hkv:
        raise UltraSpeedError(f"{hkv} KV heads can neither be split over nor replicated onto {world} ranks")
    q_heads = shard(hq, rank, world, "query heads")
    # GQA: query head h reads KV head h // group. With fewer KV heads than ranks, each rank keeps a copy of the
    # one KV head its query heads share; otherwise it keeps its own 1/world of them. Either way the local heads
    # group exactly as the global ones did.
    group = hq // hkv
    kv_heads = torch.arange(int(q_heads[0]) // group, int(q_heads[-1]) // group + 1)
    d, dv = attn.head_dim, attn.v_head_dim
    rows = torch.cat([head_rows(q_heads, d), head_rows(kv_heads, d, attn.q_size),
                      head_rows(kv_heads, dv, attn.q_size + attn.k_size)])
    keep(attn.qkv_proj, "weight", "rows", rows)
    keep(attn.o_proj, "weight", "cols", head_rows(q_heads, dv))
    drop_bias_unless(attn.o_proj, rank == 0)
    if attn.sinks is not None:
        attn.sinks = nn.Parameter(attn.sinks.index_select(0, q_heads), requires_grad=False)
    attn.num_heads, attn.num_kv_heads = len(q_heads), len(kv_heads)
    attn.q_size, attn.k_size, attn.v_size = len(q_heads) * d, len(kv_heads) * d, len(kv_heads) * dv


def gate_up_rows(intermediate: int, rank: int, world: int) -> torch.Tensor:
    """Rows of a fused [gate | up] projection for rank's share of the intermediate features, gate then up."""
    local = shard(intermediate, rank, world, "intermediate features")
    return torch.cat([local, intermediate + local])


def shard_mlp(mlp: nn.Module, rank: int, world: int) -> None:
    """A DenseMLP (or a model's shared experts, which are one)."""
    intermediate = num_rows(mlp.gate_up_proj, "weight") // 2
    keep(mlp.gate_up_proj, "weight", "rows", gate_up_rows(intermediate, rank, world))
    keep(mlp.down_proj, "weight", "cols", shard(intermediate, rank, world, "intermediate features"))
    drop_bias_unless(mlp.down_proj, rank == 0)


def shard_expert_features(experts: nn.Module, rank: int, world: int) -> None:
    """Tensor parallelism inside every expert (MoE layers when expert parallelism is off): all ranks keep all
    experts, each with 1/world of every expert's intermediate features."""
    intermediate = num_rows(experts, "gate_up_proj") // 2
    keep(experts, "gate_up_proj", "rows", gate_up_rows(intermediate, rank, world))
    keep(experts, "down_proj", "cols", shard(intermediate, rank, world, "expert intermediate features"))
