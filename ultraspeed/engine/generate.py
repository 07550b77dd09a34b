"""Plain autoregressive decoding of one sequence: prefill once, then one target forward per token.

`generate_plain` yields lists of newly committed token ids (always one here; speculative decoding yields
several per step through the same interface) and fills a `GenerationStats` as it goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ultraspeed.engine.kv_cache import KVCache
from ultraspeed.engine.sampler import SamplingParams, make_generator, sample
from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.decoder import Decoder


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0          # decode-phase target forwards (the prefill is not counted)
    prefill_tokens: int = 0           # prompt tokens this request ran through the target (0: it shared a prefill)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    accepted_lengths: list[int] = field(default_factory=list)   # tokens committed per decode forward
    drafts_verified: list[int] = field(default_factory=list)    # drafts each speculative forward verified
    lookup_steps: int = 0             # speculative forwards that verified a lookup draft instead of the drafter's
    plain_after: int | None = None    # speculative decoding gave up after this many steps (drafter not worth it)
    finish_reason: str | None = None  # "stop" | "length"

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per target forward (the prefill's first token counts toward none)."""
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else 1.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 4), "prefill_seconds": round(self.prefill_seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "decode_tokens_per_s": round((self.new_tokens - 1) / self.decode_seconds, 2)
            if self.decode_seconds > 0 and self.new_tokens > 1 else 0.0,
            "mean_accepted": round(self.mean_accepted, 3), "target_forwards": self.target_forwards,
            "finish_reason": self.finish_reason,
            **({"mean_drafts_verified": round(sum(self.drafts_verified) / len(self.drafts_verified), 3)}
               if self.drafts_verified else {}),
            **({"plain_after": self.plain_after} if self.plain_after is not None else {}),
            **({"lookup_steps": self.lookup_steps} if self.lookup_steps else {}),
        }


def check_prompt_fits(prompt_len: int, cache: KVCache, model: Decoder) -> int:
    """Return how many tokens may still be generated; a prompt that leaves no room is a clear error."""
    limit = min(cache.max_len, model.config.max_position)
    if prompt_len == 0:
        raise UltraSpeedError("the prompt is empty")
    if prompt_len >= limit:
        raise UltraSpeedError(f"prompt of {prompt_len} tokens does not fit the context of {limit} tokens")
    return limit - prompt_len


def take_committed(tokens: list[int], stats: GenerationStats, stop: set[int], max_new: int,
                   t0: float) -> tuple[list[int], bool]:
    """Count a step's committed tokens into `stats`, cut at a stop token or the token limit: (the tokens to hand
    out, whether generation ends with them, its finish_reason then set)."""
    for i, token in enumerate(tokens):
        stats.new_tokens += 1
        if token in stop or stats.new_tokens >= max_new:
            stats.finish_reason = "stop" if token in stop else "length"
            stats.decode_seconds = time.perf_counter() - t0
            return tokens[:i + 1], True
    stats.decode_seconds = time.perf_counter() - t0
    return tokens, False


def prefill(model: Decoder, cache: KVCache, prompt_ids: list[int], chunk: int = 512,
            capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the prompt into cache row 0 (in chunks, bounding activation memory). Returns the last position's
    logits [V] and, if asked, the captured layer outputs for every prompt position ([1, P, H] each)."""
    device = model.embed_tokens.weight.device
    ids = torch.tensor([prompt_ids], device=device)
    captured_chunks: list[list[torch.Tensor]] = []
    hidden = None
    for start in range(0, ids.shape[1], chunk):
        hidden, captured = model(ids[:, start:start + chunk], cache, capture_layers)
        captured_chunks.append(captured)
    features = [torch.cat(parts, dim=1) for parts in zip(*captured_chunks)] if capture_layers else []
    return model.logits(hidden[:, -1])[0], features


@torch.inference_mode()
def generate_plain(model: Decoder, prompt_ids: list[int], params: SamplingParams, stop_ids: tuple[int, ...] = (),
                   cache: KVCache | None = None, stats: GenerationStats | None = None) -> Iterator[list[int]]:
    stats = stats if stats is not None else GenerationStats()
    cache = cache if cache is not None else model.new_cache(1, len(prompt_ids) + params.max_tokens)
    cache.reset(0)
    room = check_prompt_fits(len(prompt_ids), cache, model)
    max_new = min(params.max_tokens, room)
    generator = make_generator(params.seed, model.embed_tokens.weight.device)
    stop = set() if params.ignore_eos else set(stop_ids)
    stats.prompt_tokens = len(prompt_ids)

    t0 = time.perf_counter()
    logits, _ = prefill(model, cache, prompt_ids)
    token = sample(logits, params, generator).view(1, 1)
    stats.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    while True:
        tokens, done = take_committed([int(token)], stats, stop, max_new, t0)
        yield tokens
        if done:
            return
        hidden, _ = model(token, cache)
        token = sample(model.logits(hidden[:, -1]), params, generator).view(1, 1)
        stats.target_forwards += 1
        stats.accepted_lengths.append(1)
