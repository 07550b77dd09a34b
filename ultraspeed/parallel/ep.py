"""Expert parallelism: rank r owns experts r*E/N .. (r+1)*E/N - 1 and runs only the (token, slot) pairs routed
to them; summing the ranks' outputs gives the full MoE output.

Dispatch and combine here are the simplest correct pair for a replicated-activation runtime: after tensor-parallel
(or replicated) attention every rank already holds every token, so dispatch costs nothing (a rank just picks its
pairs), and the combine is the all-reduce plan.py registers on the MoE layer. An all-to-all dispatch/combine pays
off once attention is data-parallel (each rank holding only its own tokens); docs/parallelism.md compares the
bytes. The router stays replicated: every rank computes the same routing for every token, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from ultraspeed.models.moe import Experts
from ultraspeed.parallel.slicing import keep_experts
from ultraspeed.parallel.tp import shard


class ExpertShard(nn.Module):
    """Routes (token, slot) pairs to `local`, which holds experts first .. first+local.num_experts-1 of a larger
    set; pairs routed to other ranks' experts are skipped (they contribute zero here).

    `local` is any Experts (dense, MXFP4-packed, fake-quant): only its per-expert `expert_forward` is used."""

    def __init__(self, local: Experts, first: int) -> None:
        super().__init__()
        self.local, self.first = local, first

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, H]; weights/ids [N, k] with global expert ids -> this shard's share of the output [N, H]."""
        top_k, E = ids.shape[-1], self.local.num_experts
        local = ids.reshape(-1) - self.first
        # Pairs for other ranks' experts get the id E: they sort after every local expert and are never run.
        local = torch.where((local >= 0) & (local < E), local, E)
        order = local.argsort(stable=True)
        counts = torch.bincount(local, minlength=E + 1)[:E].tolist()
        token_of = order // top_k
        slot_weight = weights.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(x)
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = token_of[start:start + count]
                y = self.local.expert_forward(e, x.index_select(0, rows))
                out.index_add_(0, rows, y * slot_weight[start:start + count].to(x.dtype))
                start += count
        return out

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.local.num_experts - 1}"


def shard_experts(experts: Experts, rank: int, world: int) -> ExpertShard:
    owned = shard(experts.num_experts, rank, world, "experts")
    keep_experts(experts, owned)
    return ExpertShard(experts, int(owned[0]))
