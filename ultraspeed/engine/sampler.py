"""Turning logits into tokens: greedy, temperature, top-k, top-p, with a per-request seed.

`token_distribution` is the single definition of "the target distribution" for a request; plain sampling and
speculative rejection sampling both draw from it, which is what makes speculative sampling lossless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Temperatures below this decode greedily (vLLM's rule): logits divided by a tiny temperature overflow float32,
# and the distribution they stand for is the argmax's one-hot anyway.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                # 0 = no limit
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError("temperature must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:   # torch takes [-2**63, 2**64); any other integer is folded into it rather than refused
        g.manual_seed(seed if -(1 << 63) <= seed < (1 << 64) else seed % (1 << 64))
    return g


def token_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [..., V] after temperature, top-k and top-p (greedy: one-hot on the argmax)."""
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = nucleus_candidates(probs, params.top_p)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses the line is kept), and always
        # the likeliest token: a top_p below float32's range would otherwise cut them all.
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        cut = mass_before >= params.top_p
        cut[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def nucleus_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable tokens in descending order (probabilities, ids), enough of them that every row's
    nucleus lies inside. Sorting a whole 50k vocabulary took 3.5 ms per token on a CPU, longer than a decode step
    of the default model, while a language model's nucleus is almost always among its few hundred likeliest
    tokens: try those first (top-k is ~30x cheaper), widen only when some row's mass there falls short."""
    vocab = probs.shape[-1]
    k = min(256, vocab)
    while True:
        values, ids = probs.topk(k, dim=-1)
        # Every row's top k reach top_p: all tokens past them have mass_before >= top_p, so are dropped anyway.
        if k == vocab or bool((values.sum(-1) >= top_p).all()):
            return values, ids
        k = min(vocab, k * 8)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits [..., V]."""
    if params.greedy:
        return logits.argmax(-1)
    probs = token_distribution(logits, params)
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of probs [..., V], with probability proportional to its entry (see inverse_cdf)."""
    u = torch.rand(probs.shape[:-1].numel(), 1, generator=generator, device=probs.device, dtype=torch.float32)
    return inverse_cdf(probs, u.view(probs.shape[:-1]))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The index whose cumulative-probability interval holds u * total, per row of probs [..., V] (u [...] in
    [0, 1)): one cumulative sum and a binary search, 0.05 ms over a 50k vocabulary on a CPU where
    torch.multinomial took 1 ms. A zero-probability entry is never drawn: its cumulative sum equals its
    predecessor's, and the search returns the first index whose sum exceeds the target. Shapes never depend on
    the data, so a captured CUDA graph can run it (runtime/device_sampling.py)."""
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(-1)
    total = cdf[:, -1:]
    target = u.reshape(-1, 1).to(cdf.dtype) * total
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))   # rounding must not reach it
    # The clamp keeps a row of NaNs (from NaN logits) from drawing an id past the vocabulary.
    return torch.searchsorted(cdf, target, right=True).clamp_(max=flat.shape[-1] - 1).view(probs.shape[:-1])
