"""What a request costs: base prices per million tokens (the standard tier), times the tier's multiplier.

Billing follows OpenAI's usage accounting: the prompt is counted once per prompt (once it reached the engine: a
call cancelled while still queued costs nothing), completion tokens are counted for every generated candidate
(with best-of-N you pay for all N candidates, not just the winner), up to the token that completed a stop
string. A speculative step may have committed a few tokens past it; the same text costs the same tokens on
either tier.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prices:
    # Defaults match `ultraspeed cost`, so the estimator and the server agree out of the box.
    input_per_million: float = 0.50     # USD per million prompt tokens at 1x
    output_per_million: float = 2.00    # USD per million completion tokens at 1x

    def __post_init__(self) -> None:
        if self.input_per_million < 0 or self.output_per_million < 0:
            raise ValueError("prices must be >= 0")


def request_cost(prices: Prices, multiplier: float, prompt_tokens: int, completion_tokens: int) -> float:
    """USD."""
    return (prompt_tokens * prices.input_per_million
            + completion_tokens * prices.output_per_million) * multiplier / 1_000_000


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
