"""Capture a static step (runtime/static_step.py) once, replay it every decode step.

On CUDA, `CapturedStep` warms the step up on a side stream (Triton compiles, cuBLAS picks its kernels, the
caching allocator settles), restores the step's state buffers, captures one call into a `torch.cuda.CUDAGraph`
and from then on only replays it: one launch per step, no gaps between kernels for Python to fill. Elsewhere
(the CPU) it calls the step eagerly: the same code path, so CPU tests cover everything but the capture itself.

`StepGraphs` keeps one captured step per bucket (batch, and e.g. block size and greedy / sampled), built on first
use and sharing one memory pool; a batch of n rows runs in the smallest batch bucket >= n, with rows n.. padded
(see `load_rows`). The serving engine's lanes run on it (runtime/serving.py).

Capture when the step's state buffers hold valid lengths (zeros before any sequence, or the live lengths): the
warm-up runs (each from the same state) write KV entries only where the first real step will, at positions >=
lengths, which are not committed, and the state is restored after.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch


class StaticStepLike(Protocol):
    lengths: torch.Tensor

    def state(self) -> list[torch.Tensor]: ...

    def step(self) -> Any: ...


def graphs_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


class CapturedStep:
    """`captured()` runs one step: replays the CUDA graph, or calls `step.step()` where graphs are off."""

    def __init__(self, step: StaticStepLike, enabled: bool | None = None, warmup: int = 3,
                 pool: Any = None) -> None:
        self.step = step
        device = step.lengths.device
        self.enabled = graphs_available(device) if enabled is None else enabled
        if self.enabled and not graphs_available(device):
            raise ValueError(f"CUDA graphs need a CUDA device; the step lives on {device}")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None
        if self.enabled:
            self._capture(warmup, pool)

    def _capture(self, warmup: int, pool: Any) -> None:
        saved = [t.clone() for t in self.step.state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                # Every warm-up run starts from the saved state, so it writes KV only at the positions the first
                # real step writes (and overwrites). Chained runs would write `warmup` steps past the lengths,
                # out of bounds of a cache sized for the real steps only (a device-side assert on CUDA).
                for t, s in zip(self.step.state(), saved):
                    t.copy_(s)
                self.step.step()
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(self.step.state(), saved):
            t.copy_(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = self.step.step()     # recorded, not run: the state is left as restored
        torch.cuda.synchronize()

    def __call__(self) -> Any:
        if self.graph is None:
            return self.step.step()
        self.graph.replay()
        return self.outputs


def load_rows(step: StaticStepLike, tokens: Sequence[int], lengths: Sequence[int]) -> None:
    """Write n rows' next input tokens (anchors for a speculative step) and committed lengths into a step of
    batch >= n; rows n.. get token 0 at length 0 (their cache rows must be free: the step writes there)."""
    buffer = step.anchors if hasattr(step, "anchors") else step.tokens
    n, batch = len(tokens), step.lengths.shape[0]
    if n > batch or len(lengths) != n:
        raise ValueError(f"{n} rows (and {len(lengths)} lengths) do not fit a step of batch {batch}")
    padded_tokens = torch.zeros(batch, dtype=torch.long)
    padded_lengths = torch.zeros(batch, dtype=torch.long)
    padded_tokens[:n] = torch.tensor(list(tokens), dtype=torch.long)
    padded_lengths[:n] = torch.tensor(list(lengths), dtype=torch.long)
    buffer.copy_(padded_tokens.view(buffer.shape))
    step.lengths.copy_(padded_lengths)


def pick_bucket(batch: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= batch."""
    fitting = [b for b in buckets if b >= batch]
    if batch < 1 or not fitting:
        raise ValueError(f"no bucket holds a batch of {batch} (buckets: {sorted(buckets)})")
    return min(fitting)


class StepGraphs:
    """Captured steps per bucket: `get(batch, *variant)` -> the step for (the smallest batch bucket >= batch,
    *variant), built by `make_step(bucket, *variant)` on first use (variant: e.g. block size, sampling)."""

    def __init__(self, make_step: Callable[..., StaticStepLike], batch_buckets: Sequence[int],
                 enabled: bool | None = None, warmup: int = 3) -> None:
        self.make_step = make_step
        self.batch_buckets = sorted(set(batch_buckets))
        self.enabled, self.warmup = enabled, warmup
        self.steps: dict[tuple, CapturedStep] = {}
        self.pool: Any = None

    def get(self, batch: int, *variant: Any) -> CapturedStep:
        key = (pick_bucket(batch, self.batch_buckets), *variant)
        if key not in self.steps:
            step = self.make_step(*key)
            enabled = graphs_available(step.lengths.device) if self.enabled is None else self.enabled
            if enabled and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            self.steps[key] = CapturedStep(step, enabled, self.warmup, self.pool)
        return self.steps[key]
