"""The process group every parallel rank joins, set up from the environment `torchrun` exports.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) starts one process
per GPU; each calls `init_from_env`, which picks the backend from the hardware: NCCL when the process owns a
GPU, gloo on CPUs (development, CI, the tests). Nothing is kept in module globals: the returned `DistEnv` is
passed to whatever needs the rank or the group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ultraspeed.errors import UltraSpeedError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int                   # index among the processes of this machine: picks the GPU
    device: torch.device
    group: dist.ProcessGroup | None   # None = the default (world) group

    @property
    def is_main(self) -> bool:
        """Rank 0 alone talks to the user (prints the stream, serves HTTP); the others only compute."""
        return self.rank == 0


def pick_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(device_type: str | None = None) -> DistEnv:
    """Join the process group described by torchrun's environment variables (initializing it if needed).

    device_type: "cuda" or "cpu"; default: cuda when a GPU is visible. Each process takes GPU LOCAL_RANK.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UltraSpeedError(f"parallel runs are launched with torchrun (missing {', '.join(missing)}), e.g. "
                              "torchrun --nproc-per-node 8 -m ultraspeed generate PROMPT --tp 8")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # device_id binds the NCCL communicator to this GPU eagerly (and avoids a warning); gloo needs none.
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(pick_backend(device), rank=rank, world_size=world_size, **kwargs)
    return DistEnv(rank, world_size, local_rank, device, group=None)


def shutdown(env: DistEnv | None) -> None:
    if env is not None and dist.is_initialized():
        dist.destroy_process_group()


def shared_seed(seed: int | None, env: DistEnv) -> int:
    """The sampling seed every rank uses: the given one, or one drawn by rank 0 and broadcast. Ranks that drew
    their own would sample different tokens from identical logits and fall out of lockstep."""
    if seed is not None:
        return seed
    value = torch.randint(0, 2**62, (1,)).to(env.device)
    dist.broadcast(value, src=0, group=env.group)
    return int(value)


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum x over the group, in place. Every rank ends with bitwise the same tensor (a ring all-reduce reduces
    each chunk once and then broadcasts it), which is what keeps the ranks' sampling decisions in lockstep."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x
