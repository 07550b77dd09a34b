"""Sampling inside a captured step: per-row temperature / top-k / top-p and per-row seeds, all on the device,
with no shape that depends on the data and no generator state for a graph to capture.

Randomness is a pure function of (the row's seed, a position, a stream): each position of a sequence owns one
uniform for the acceptance test of the draft there (ACCEPT) and one for drawing a token from its logits (DRAW).
A hash of integers needs no generator state, so a replayed graph draws fresh numbers as the lengths advance, the
same seed gives the same text whatever else is in the batch, and the CPU and the GPU draw identical uniforms.
Each uniform decides at most one thing along a sequence (a speculative step tests positions L..L+a and draws at
L+a; the next step starts at L+a+1, and the tests it repeats past L+a decided nothing before), which is what the
rejection rule needs to stay exact.

`row_distribution` is `engine.sampler.token_distribution` with per-row parameters: a full sort replaces the
candidate search (nucleus_candidates), whose widening is a host decision.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import torch

from ultraspeed.engine.sampler import SamplingParams

ACCEPT, DRAW = 1, 2            # the streams of uniforms each position owns
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 in int64, in 16-bit halves so that no product overflows."""
    return ((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (Wellons' "lowbias32"), on int64 tensors holding 32 bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniforms in [0, 1) (float32, 24 random bits) for seeds [b] (63-bit, >= 0) and positions [b, n] (int64)."""
    key = mix32((seeds & _M32) ^ mix32(seeds >> 32)).view(-1, 1)
    x = mix32(key ^ (positions & _M32))
    x = mix32(x ^ mix32(torch.full_like(x, stream)))
    return (x >> 8).float() * 2.0 ** -24


def row_distribution(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                     top_k: torch.Tensor) -> torch.Tensor:
    """Probabilities [b, ..., V] for logits [b, ..., V] under each row's parameters ([b] each; temperature 0 =
    greedy, a one-hot on the argmax; top_k 0 = no limit; top_p 1 = no cut): token_distribution, row by row."""
    logits = logits.float()
    vocab = logits.shape[-1]
    shape = (-1,) + (1,) * (logits.dim() - 1)
    greedy = (temperature == 0).view(shape)
    scaled = logits / torch.where(greedy, torch.ones_like(temperature).view(shape), temperature.view(shape))
    ordered, order = scaled.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).view(shape)
    kth = ordered.gather(-1, (k - 1).expand(*ordered.shape[:-1], 1))
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))      # ties with the k-th stay, as in top-k
    probs = torch.softmax(ordered, dim=-1)
    # The smallest prefix whose mass reaches top_p (the token that crosses the line is kept); rows with top_p 1
    # skip the cut, which rounding in the running sum could otherwise apply to their last tokens.
    cut = (probs.cumsum(-1) - probs >= top_p.view(shape)) & (top_p < 1).view(shape)
    cut[..., 0] = False                      # the likeliest token always stays (a top_p that rounds to 0)
    probs = probs.masked_fill(cut, 0.0)
    probs = torch.zeros_like(probs).scatter_(-1, order, probs / probs.sum(-1, keepdim=True))
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)


class SamplingBuffers:
    """Per-row sampling parameters of a static step, on the device at fixed addresses (a captured graph reads
    them as they are at each replay). Rows never loaded decode greedily."""

    def __init__(self, batch: int, device: torch.device | str) -> None:
        self.temperature = torch.zeros(batch, device=device)
        self.top_p = torch.ones(batch, device=device)
        self.top_k = torch.zeros(batch, dtype=torch.long, device=device)
        self.seeds = torch.zeros(batch, dtype=torch.long, device=device)

    def load(self, params: Sequence[SamplingParams], seeds: Sequence[int]) -> None:
        """Rows 0..n-1 take params[r] with seeds[r] (seed_of: fixed per request, not per load); rows n.. greedy."""
        batch = self.temperature.shape[0]
        if len(params) > batch or len(seeds) != len(params):
            raise ValueError(f"{len(params)} rows ({len(seeds)} seeds) do not fit sampling buffers of {batch}")
        pad = batch - len(params)
        rows = list(params) + [SamplingParams()] * pad
        self.temperature.copy_(torch.tensor([p.temperature for p in rows], dtype=torch.float32))
        self.top_p.copy_(torch.tensor([p.top_p for p in rows], dtype=torch.float32))
        self.top_k.copy_(torch.tensor([p.top_k for p in rows], dtype=torch.long))
        self.seeds.copy_(torch.tensor(list(seeds) + [0] * pad, dtype=torch.long))

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        b = logits.shape[0]
        return row_distribution(logits, self.temperature[:b], self.top_p[:b], self.top_k[:b])

    def uniform(self, positions: torch.Tensor, stream: int) -> torch.Tensor:
        return counter_uniform(self.seeds[:positions.shape[0]], positions, stream)


def seed_of(params: SamplingParams) -> int:
    """The request's seed as a non-negative 63-bit integer (fresh randomness when it has none)."""
    return secrets.randbits(63) if params.seed is None else params.seed % (1 << 63)
