"""Generation loops over the static steps: prefill each row with the dynamic path (prompt lengths vary), then
replay one captured step per decode step, reading back only the step's small result.

`generate_static` streams one sequence for `ultraspeed generate --runtime static` (the default on a GPU), greedy
or sampled; the greedy batch loops serve the tests (static == dynamic, token for token) and scripts/gpu_bench.py.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from ultraspeed.engine.generate import GenerationStats, check_prompt_fits, take_committed
from ultraspeed.engine.kv_cache import KVCache
from ultraspeed.engine.lookup_corpus import LookupCorpus
from ultraspeed.engine.lookup_draft import NgramIndex
from ultraspeed.engine.sampler import SamplingParams, inverse_cdf
from ultraspeed.engine.speculative import append_context, features_of, new_draft_cache
from ultraspeed.models.decoder import Decoder
from ultraspeed.models.dflash import DFlashDrafter
from ultraspeed.runtime.backend import TorchBackend
from ultraspeed.runtime.device_sampling import DRAW, SamplingBuffers, seed_of
from ultraspeed.runtime.graphs import CapturedStep, load_rows
from ultraspeed.runtime.static_step import DecodeStep, SpeculativeStep, committed_tokens


@torch.no_grad()
def prefill_rows(model: Decoder, cache: KVCache, prompts: list[list[int]],
                 capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Prompt r into cache row r (dynamic path). -> last-position logits [n, V], captured features per row."""
    device = model.embed_tokens.weight.device
    logits, features = [], []
    for row, prompt in enumerate(prompts):
        cache.reset(row)
        hidden, captured = model(torch.tensor([prompt], device=device), cache, capture_layers, first_row=row)
        logits.append(model.logits(hidden[:, -1]))
        features.append(captured)
    return torch.cat(logits), features


@torch.no_grad()
def decode_greedy(model: Decoder, prompts: list[list[int]], max_new: int, backend: TorchBackend | None = None,
                  graphs: bool | None = None) -> list[list[int]]:
    """max_new greedy tokens for every prompt, all rows in one static decode step."""
    n = len(prompts)
    cache = model.new_cache(n, max(len(p) for p in prompts) + max_new + 1)
    logits, _ = prefill_rows(model, cache, prompts)
    first = logits.argmax(-1).tolist()
    step = DecodeStep(model, cache, n, backend)
    load_rows(step, first, cache.lengths[:n].tolist())
    run = CapturedStep(step, graphs)
    out = [[t] for t in first]
    for _ in range(max_new - 1):
        next_tokens, _ = run()
        for row, t in enumerate(next_tokens.tolist()):
            out[row].append(t)
    cache.lengths[:n] = step.lengths.cpu()
    return out


@torch.no_grad()
def speculative_greedy(target: Decoder, drafter: DFlashDrafter, prompts: list[list[int]], max_new: int,
                       backend: TorchBackend | None = None, graphs: bool | None = None,
                       step_class: type[SpeculativeStep] = SpeculativeStep,
                       stats: dict | None = None) -> list[list[int]]:
    """max_new greedy tokens per prompt by DFlash speculative decoding, all rows in one static step.
    `stats` (if given) gets "steps" and "accepted" (tokens committed per row per step)."""
    n, B = len(prompts), drafter.config.block_size
    # Every row advances at every step until the slowest has max_new tokens, so a row the drafter suits may
    # commit B tokens at each of up to max_new - 1 steps, and a step writes a whole block past its length.
    max_len = max(len(p) for p in prompts) + max_new * B + 1
    cache = target.new_cache(n, max_len)
    draft_cache = new_draft_cache(drafter, n, max_len)
    logits, features = prefill_rows(target, cache, prompts, drafter.config.target_layer_ids)
    for row, captured in enumerate(features):
        append_context(drafter, draft_cache, row, features_of(captured))
    first = logits.argmax(-1).tolist()
    step = step_class(target, drafter, cache, draft_cache, n, backend)
    load_rows(step, first, cache.lengths[:n].tolist())
    lengths = cache.lengths[:n].tolist()
    run = CapturedStep(step, graphs)
    out = [[t] for t in first]
    steps, accepted = 0, []
    while min(len(tokens) for tokens in out) < max_new:
        if max(lengths) + B > max_len:
            raise RuntimeError("cache full")      # cannot happen with the max_len above; a guard for edits
        result, _ = run()
        committed = committed_tokens(result)
        steps += 1
        accepted.append([len(c) for c in committed])
        for row, tokens in enumerate(committed):
            out[row].extend(tokens)
            lengths[row] += len(tokens)
    if stats is not None:
        stats.update(steps=steps, accepted=accepted)
    return [tokens[:max_new] for tokens in out]


def first_tokens(logits: torch.Tensor, lengths: list[int], sampling: SamplingBuffers | None) -> list[int]:
    """The token after each row's prompt from its prefill logits [n, V]: the argmax, or drawn with the uniform
    of the prompt's last position (the draw the static step would make there)."""
    if sampling is None:
        return logits.argmax(-1).tolist()
    positions = torch.tensor(lengths, device=logits.device).view(-1, 1) - 1
    u = sampling.uniform(positions, DRAW).view(-1)
    return inverse_cdf(sampling.distribution(logits), u).tolist()


@torch.no_grad()
def generate_static(target: Decoder, prompt_ids: list[int], params: SamplingParams, stop_ids: tuple[int, ...] = (),
                    drafter: DFlashDrafter | None = None, stats: GenerationStats | None = None,
                    graphs: bool | None = None, backend: TorchBackend | None = None,
                    lookup: bool = False, corpus: LookupCorpus | None = None) -> Iterator[list[int]]:
    """Decoding of one sequence through the static step, captured as a CUDA graph on a GPU (graphs None: there;
    eagerly elsewhere): plain decoding, or DFlash with `drafter` (and lookup drafts where the context repeats,
    with `lookup`, and from `corpus` where the context has none). Greedy or sampled; greedy output is generate_plain's, token for token, and sampling follows
    the same distribution (its uniforms are hashed from the seed, so the draws differ from the dynamic path's).
    Each step reads back only its small result; capture happens once, after the prefill."""
    B = drafter.config.block_size if drafter is not None else 1
    stats = stats if stats is not None else GenerationStats()
    cache = target.new_cache(1, len(prompt_ids) + params.max_tokens + B)
    room = check_prompt_fits(len(prompt_ids), cache, target)
    if room < B:         # too little room left for a verify block: plain steps still fit
        drafter, B = None, 1
    max_new = min(params.max_tokens, room - B + 1)      # the last step writes up to B positions past its anchor
    stop = set() if params.ignore_eos else set(stop_ids)
    stats.prompt_tokens = len(prompt_ids)
    sampling = not params.greedy

    t0 = time.perf_counter()
    capture = drafter.config.target_layer_ids if drafter is not None else ()
    logits, features = prefill_rows(target, cache, [prompt_ids], capture)
    if drafter is not None:
        draft_cache = new_draft_cache(drafter, 1, cache.max_len)
        append_context(drafter, draft_cache, 0, features_of(features[0]))
        step = SpeculativeStep(target, drafter, cache, draft_cache, 1, backend, sampling)
    else:
        step = DecodeStep(target, cache, 1, backend, sampling)
    if step.sampling is not None:
        step.sampling.load([params], [seed_of(params)])
    tokens = first_tokens(logits, [len(prompt_ids)], step.sampling)
    load_rows(step, tokens, [len(prompt_ids)])
    index = NgramIndex.of(prompt_ids + tokens, corpus) if lookup and drafter is not None else None
    run = CapturedStep(step, graphs)
    lookup_run: CapturedStep | None = None     # the step without the drafter, captured when first needed
    stats.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    while True:
        out, done = take_committed(tokens, stats, stop, max_new, t0)
        yield out
        if done:
            return
        draft: list[int] = []
        if index is not None:
            draft, _ = index.draft(B - 1)
            step.load_lookups([draft])
            stats.lookup_steps += bool(draft)
        if draft:        # every row (the one) looked up: no drafter forward, as in the dynamic path
            lookup_run = lookup_run or CapturedStep(step.without_drafter(), graphs)
            result, _ = lookup_run()
        else:
            result, _ = run()
        tokens = committed_tokens(result)[0] if drafter is not None else [int(result[0])]
        if index is not None:
            index.record_step(len(tokens), bool(draft))
            index.extend(tokens)
        stats.target_forwards += 1
        stats.accepted_lengths.append(len(tokens))
