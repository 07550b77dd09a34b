"""Past one device: tensor and expert parallelism on torch.distributed, applied to a loaded model as surgery.

    dist.py     process group from torchrun's environment (NCCL on GPUs, gloo on CPUs)
    slicing.py  keeping rows, columns or experts of a weight, dense or MXFP4-packed
    tp.py       slicing attention heads and MLP features (column- then row-parallel)
    ep.py       slicing MoE layers by expert
    plan.py     --tp/--ep -> which modules are sliced and where partial outputs are all-reduced
    follow.py   serving: rank 0 runs the server, the other ranks replay its model calls

See docs/parallelism.md for launching and for the communication each step costs.
"""

from ultraspeed.parallel.dist import DistEnv, init_from_env, shared_seed, shutdown
from ultraspeed.parallel.follow import follow, lead
from ultraspeed.parallel.plan import ParallelPlan, parallelize, shard_for_this_rank

__all__ = ["DistEnv", "ParallelPlan", "follow", "init_from_env", "lead", "parallelize", "shard_for_this_rank",
           "shared_seed", "shutdown"]
