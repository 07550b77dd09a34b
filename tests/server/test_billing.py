"""What a call is billed (server/billing.py, Generation.usage): the prompts that reached the engine, and the
completion tokens up to the one that completed a stop string, so the same text costs the same on either tier
however many tokens a speculative step committed past it."""

from __future__ import annotations

import asyncio

from tests.server.conftest import tiny_tokenizer
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.engine.scheduler import Update
from ultraspeed.server.billing import Prices
from ultraspeed.server.completions import Generation
from ultraspeed.server.metrics import Metrics
from ultraspeed.server.tiers import make_tiers


class NoEngine:
    """Generation only asks the engine to cancel; the updates are fed to it by hand here."""

    def __init__(self) -> None:
        self.cancelled: list[int] = []

    def cancel(self, request_id: int) -> None:
        self.cancelled.append(request_id)


def billed(prompts, updates, stop=("STOP",)):
    """Generation.usage() after feeding `updates` ({candidate index: [token strings per Update]})."""
    async def run():
        tiers = make_tiers("tiny", 1, 1, 3.0)
        gen = Generation(NoEngine(), tiny_tokenizer(), Metrics(["standard", "ultraspeed"]), tiers[1], Prices(),
                         prompts, 1, [SamplingParams(max_tokens=50)] * len(prompts), stop)
        for index, blocks in updates.items():
            for text in blocks:
                ids = [ord(ch) for ch in text]
                gen._apply(gen.candidates[index], Update(ids, accepted=len(ids)))
        return gen.usage()
    return asyncio.run(run())


def test_a_block_past_the_stop_string_bills_what_one_token_at_a_time_would():
    speculative = billed([[1, 2, 3]], {0: ["ab S", "TOP and more"]})
    plain = billed([[1, 2, 3]], {0: list("ab STOP")})
    assert speculative == plain == {"prompt_tokens": 3, "completion_tokens": len("ab STOP"),
                                    "total_tokens": 3 + len("ab STOP")}
    assert billed([[1, 2, 3]], {0: ["no stop here"]})["completion_tokens"] == len("no stop here")


def test_a_prompt_that_never_reached_the_engine_is_not_billed():
    assert billed([[1, 2, 3], [4, 5]], {0: ["ab"]}) == {"prompt_tokens": 3, "completion_tokens": 2,
                                                       "total_tokens": 5}
    assert billed([[1, 2, 3], [4, 5]], {})["prompt_tokens"] == 0
