"""Plain decoding of many prompts at once, as a running batch that refills as sequences finish.

Active sequences live in cache rows 0..B-1. A new prompt is prefilled into the next free row; a finished
sequence's row is refilled by moving the last active row into it, so every decode step is one target forward
over a contiguous block of rows. Used to generate distillation data and by the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ultraspeed.engine.sampler import SamplingParams, make_generator, sample
from ultraspeed.models.decoder import Decoder


@dataclass
class _Running:
    index: int                       # position in the caller's prompt list
    tokens: list[int] = field(default_factory=list)


@torch.inference_mode()
def generate_batch(model: Decoder, prompts: list[list[int]], params: SamplingParams, stop_ids: tuple[int, ...] = (),
                   max_batch: int = 16, on_finish: Callable[[int, list[int]], None] | None = None) -> list[list[int]]:
    """Completions (token ids, stop token included) for every prompt, in order."""
    max_len = max(len(p) for p in prompts) + params.max_tokens + 1
    cache = model.new_cache(max_batch, max_len)
    generator = make_generator(params.seed, model.embed_tokens.weight.device)
    device = model.embed_tokens.weight.device
    stop = set() if params.ignore_eos else set(stop_ids)
    results: list[list[int] | None] = [None] * len(prompts)
    running: list[_Running] = []
    next_tokens: list[int] = []
    queue = list(range(len(prompts)))

    def finish(row: int) -> None:
        seq = running[row]
        results[seq.index] = seq.tokens
        if on_finish:
            on_finish(seq.index, seq.tokens)
        last = len(running) - 1
        if row != last:
            cache.move_row(last, row)
            running[row], next_tokens[row] = running[last], next_tokens[last]
        running.pop(), next_tokens.pop()
        cache.reset(last)

    while queue or running:
        while queue and len(running) < max_batch:      # admit new prompts into free rows
            index = queue.pop(0)
            row = len(running)
            cache.reset(row)
            hidden, _ = model(torch.tensor([prompts[index]], device=device), cache, first_row=row)
            running.append(_Running(index))
            next_tokens.append(int(sample(model.logits(hidden[:, -1]), params, generator)))
        for row in range(len(running) - 1, -1, -1):     # commit sampled tokens; retire finished rows
            seq = running[row]
            seq.tokens.append(next_tokens[row])
            if next_tokens[row] in stop or len(seq.tokens) >= params.max_tokens:
                finish(row)
        if not running:
            continue
        ids = torch.tensor(next_tokens, device=device).view(-1, 1)
        hidden, _ = model(ids, cache)
        next_tokens = sample(model.logits(hidden[:, -1]), params, generator).tolist()
    return results
