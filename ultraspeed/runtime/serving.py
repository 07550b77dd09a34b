"""The serving engine's lanes (engine/scheduler.py) on the static steps: with `EngineConfig.runtime = "static"`
each lane step loads its rows into a preallocated step for its batch bucket and replays it (a CUDA graph on a
GPU, eager elsewhere), instead of issuing the dynamic path's ops one by one from Python.

The lane keeps its rows 0..b-1 and its caches' host-side lengths, as in the dynamic path; per step the host writes
the rows' last tokens, lengths, sampling parameters and lookup drafts into the step's buffers and reads back one
small result. Rows b.. of the bucket are padding at length 0 in free cache rows (a later prefill overwrites
whatever they wrote). What the dynamic lanes do that this does not: adaptive verification (a GPU verifies whole
blocks for about the price of one position) and lookup drafts in the plain lane (its static step takes one token
per row); output is exact either way.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.runtime.graphs import StaticStepLike, StepGraphs, load_rows

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def batch_buckets(rows: int) -> list[int]:
    """Powers of two below `rows`, then `rows` itself: a lane of 8 rows captures steps of 1, 2, 4 and 8."""
    return [b for b in BATCH_BUCKETS if b < rows] + [rows]


class StaticRunner:
    """Runs a lane's steps through `make_step(batch, block, sampling, lookup_only)` steps, one per (bucket, block,
    greedy or sampled, drafter or not): a batch with no sampled row keeps the cheaper greedy step (no sort over
    the vocabulary), and one where every row has a lookup draft skips the drafter's forward (as the dynamic path
    does; runtime/static_step.SpeculativeStep.without_drafter)."""

    def __init__(self, make_step: Callable[[int, int, bool, bool], StaticStepLike], rows: int,
                 graphs: bool | None = None) -> None:
        self.graphs = StepGraphs(make_step, batch_buckets(rows), enabled=graphs)
        self.loaded: dict[int, tuple] = {}     # id(step) -> the (params, seeds) its sampling buffers hold

    def run(self, block: int, tokens: Sequence[int], lengths: Sequence[int], params: Sequence[SamplingParams],
            seeds: Sequence[int], lookups: Sequence[list[int]] | None = None) -> torch.Tensor:
        """One step of rows 0..n-1 (last tokens, committed lengths, sampling parameters and seeds, lookup drafts
        for a speculative step) -> the step's result for those rows, on the host: next tokens [n] (block 1) or
        the speculative result [n, B+1] (runtime/static_step.committed_tokens reads it)."""
        n = len(tokens)
        sampling = any(not p.greedy for p in params)
        lookup_only = lookups is not None and all(lookups)
        captured = self.graphs.get(n, block, sampling, lookup_only)
        step: Any = captured.step
        load_rows(step, tokens, lengths)
        # The same rows keep the same parameters from step to step: rewrite the buffers only when they change.
        if sampling and self.loaded.get(id(step)) != (key := (tuple(params), tuple(seeds))):
            step.sampling.load(params, seeds)
            self.loaded[id(step)] = key
        if lookups is not None:
            step.load_lookups(list(lookups))
        result, _ = captured()
        return result[:n].cpu()
