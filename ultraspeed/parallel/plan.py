"""Which modules each rank shards, and where the partial outputs are summed: `parallelize(model, plan, ...)`
turns a loaded Decoder into this rank's part of the model, in place (gpt-fast's tp.py, plus experts).

    --tp N: attention and dense MLPs are tensor-parallel (tp.py), one all-reduce after each;
            MoE layers, when --ep is not given, split every expert's intermediate features instead.
    --ep N: MoE layers are expert-parallel (ep.py); shared experts split by intermediate features;
            attention and dense MLPs stay replicated unless --tp is given too.
    Both flags name the same N processes (--tp 8 --ep 8 = TP attention + EP experts on one 8-GPU node).

A MoE layer sums its routed and shared partial outputs before a single all-reduce. Embeddings, the final norm,
the LM head, the router and the DFlash drafter stay replicated: every rank holds the full hidden state after
each all-reduce, computes identical logits, and so samples, drafts and accepts identically, with no extra
messages. The KV cache shrinks by itself: `Decoder.new_cache` sizes it from the sharded attention modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.decoder import Decoder
from ultraspeed.models.moe import SparseMoE
from ultraspeed.parallel.dist import DistEnv, all_reduce_sum, init_from_env
from ultraspeed.parallel.ep import shard_experts
from ultraspeed.parallel.tp import shard_attention, shard_expert_features, shard_mlp


@dataclass(frozen=True)
class ParallelPlan:
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.ep < 1:
            raise UltraSpeedError(f"--tp and --ep must be at least 1 (got {self.tp}, {self.ep})")
        if self.tp > 1 and self.ep > 1 and self.tp != self.ep:
            # 2-D meshes (TP groups inside EP groups) would need sub-groups; one group covers one node.
            raise UltraSpeedError(f"--tp {self.tp} --ep {self.ep}: give both the same size (the same processes "
                                  "do both), or only one of them")

    @property
    def world_size(self) -> int:
        return max(self.tp, self.ep)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise UltraSpeedError(f"--tp {self.tp} --ep {self.ep} needs {self.world_size} processes, "
                                  f"torchrun started {world_size}")


def sum_outputs(module: nn.Module, group: dist.ProcessGroup | None) -> None:
    """After module runs on this rank's weight slice, replace its partial output by the sum over ranks."""
    module.register_forward_hook(lambda _module, _inputs, output: all_reduce_sum(output, group))


def parallelize(model: Decoder, plan: ParallelPlan, rank: int, world_size: int,
                group: dist.ProcessGroup | None = None) -> Decoder:
    plan.check_world(world_size)
    sparse = [layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoE)]
    if plan.ep > 1 and not sparse:
        raise UltraSpeedError("--ep shards MoE experts, and this model has no MoE layers; use --tp")
    if not plan.enabled:
        return model
    for layer in model.layers:
        if plan.tp > 1:
            shard_attention(layer.self_attn, rank, world_size)
            sum_outputs(layer.self_attn, group)
        mlp = layer.mlp
        if isinstance(mlp, SparseMoE):
            if plan.ep > 1:
                mlp.experts = shard_experts(mlp.experts, rank, world_size)
            else:
                shard_expert_features(mlp.experts, rank, world_size)
            if mlp.shared_experts is not None:
                shard_mlp(mlp.shared_experts, rank, world_size)
            sum_outputs(mlp, group)
        elif plan.tp > 1:
            shard_mlp(mlp, rank, world_size)
            sum_outputs(mlp, group)
    return model


def shard_for_this_rank(model: Decoder, tp: int, ep: int) -> DistEnv | None:
    """The CLI's one step: --tp/--ep of 1 -> None (one process, model untouched); otherwise join torchrun's
    process group, keep this rank's part of `model` and move it to this rank's device."""
    plan = ParallelPlan(tp, ep)
    if not plan.enabled:
        return None
    env = init_from_env()
    parallelize(model, plan, env.rank, env.world_size, env.group).to(env.device)
    return env
