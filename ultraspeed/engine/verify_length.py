"""How many of the drafted tokens to verify: the number that maximises the expected tokens per second.

On a GPU a target forward over 16 positions costs about what one position costs (the weights are read once),
so the whole block is verified. On a CPU the forward is compute-bound: each extra position adds a sizeable
fraction of a one-token step (about a third of it for the default model here: docs/bench/acceptance.json's
step costs), and verifying
drafts the drafter itself doubts spends that time for nothing. Verifying fewer drafts never changes the output:
the target alone decides acceptance, over whatever prefix of the block it is shown.

Model. The drafter's top probability c_i at slot i estimates the chance that draft i is accepted once drafts
1..i-1 were, so verifying k drafts commits on average
    E_k = 1 + sum_{j=1..k} prod_{i<=j} c_i          tokens (the 1 is the target's own bonus token),
and a step over b rows that verifies k drafts each takes  draft + fixed + per_token * b * (k + 1)  seconds,
a line fitted to timed target forwards of 1 and B positions (StepCost, measured once per engine).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepCost:
    draft: float          # seconds of one drafter forward
    fixed: float          # seconds of a target forward that do not grow with its length (reading the weights)
    per_token: float      # seconds each verified position adds

    def seconds(self, rows: int, drafts: int) -> float:
        return self.draft + self.fixed + self.per_token * rows * (drafts + 1)

    def break_even(self, drafts_verified: list[int]) -> float:
        """Tokens a speculative step must commit on average to cost no more per token than plain decoding
        (one position, no drafter), for steps that verified these numbers of drafts."""
        plain = self.fixed + self.per_token
        if plain <= 0 or not drafts_verified:
            return 1.0
        return sum(self.seconds(1, k) for k in drafts_verified) / len(drafts_verified) / plain


# On a CPU, blocks of this many positions: verification there rarely takes more than a few drafts (the adaptive
# rule above verifies 1.2-5.6 of 15 on average), so drafting 16 positions pays ~40% more draft time for slots that
# are almost never verified. Measured side by side when this was chosen (2026-12-01, docs/drafter.md "Lookup
# drafts beside the drafter", adaptive verification with lookup drafts): block 8 ran 1.02-1.53x plain decoding,
# block 16 1.02-1.61x; 8 ahead on code (1.53 vs 1.42x) and math (1.52 vs 1.40x), 16 on agent (1.61 vs 1.47x).
CPU_BLOCK_SIZE = 8


def serving_block_size(drafter_block: int, requested: int, device: torch.device) -> int:
    """The block length to draft: `requested` if given (> 0), else CPU_BLOCK_SIZE on a CPU (never more than the
    drafter's own) and the drafter's own block on an accelerator, where verifying the whole block is free."""
    if requested:
        return requested
    return min(CPU_BLOCK_SIZE, drafter_block) if device.type == "cpu" else drafter_block


def expected_tokens(confidence: torch.Tensor) -> torch.Tensor:
    """confidence [b, n] (drafter's top probability per slot) -> expected tokens committed [b, n+1] when
    verifying 0..n drafts."""
    runs = torch.cumprod(confidence, dim=1).cumsum(dim=1)
    return 1.0 + torch.cat([runs.new_zeros(runs.shape[0], 1), runs], dim=1)


def choose_verify_length(confidence: torch.Tensor, cost: StepCost) -> int:
    """The number of drafts (0..n, shared by all rows of the step) with the most expected tokens per second."""
    b, n = confidence.shape
    tokens = expected_tokens(confidence.double()).sum(dim=0).cpu()
    seconds = torch.tensor([cost.seconds(b, k) for k in range(n + 1)], dtype=torch.float64).clamp(min=1e-12)
    # Ties (free extra positions) go to the longer verify: more drafts never commit fewer tokens.
    return n - int((tokens / seconds).flip(0).argmax())


def _timed_rounds(fns: list, device: torch.device, repeats: int) -> list[float]:
    """Median seconds of each fn, timed in interleaved rounds after one warm-up round (synchronising a GPU so
    the time is the kernels'). Interleaving matters on a shared machine: a slow spell then stretches every
    measurement of its round alike instead of one of them, which would skew the fitted line for the whole run
    (seen: a 1-thread burst made 8-position verifies look 10x dearer per position than they are)."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(repeats + 1):
        for fn, out in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


@torch.inference_mode()
def measure_step_cost(target, drafter, repeats: int = 5, context: int = 32) -> StepCost:
    """Time a drafter forward and target forwards of 1 and B positions after a short dummy context, on caches
    of their own (one row, a few dozen positions)."""
    # Imported here: speculative.py imports this module for the rule itself.
    from ultraspeed.engine.speculative import append_context, draft_block, features_of, new_draft_cache

    B = drafter.config.block_size
    device = target.embed_tokens.weight.device
    layers = drafter.config.target_layer_ids
    ids = torch.arange(context + B, device=device).view(1, -1) % target.config.vocab_size
    cache, draft_cache = target.new_cache(1, context + B), new_draft_cache(drafter, 1, context + B)
    _, captured = target(ids[:, :context], cache, layers)
    append_context(drafter, draft_cache, 0, features_of(captured))

    def verify(n: int):
        def run():
            cache.crop(0, context)
            target(ids[:, context:context + n], cache, layers)
        return run

    draft, one, block = _timed_rounds([lambda: draft_block(drafter, target, draft_cache, ids[0, :1]), verify(1),
                                       verify(B)], device, repeats)
    per_token = max(block - one, 0.0) / max(B - 1, 1)
    return StepCost(draft=draft, fixed=max(one - per_token, 0.0), per_token=per_token)
