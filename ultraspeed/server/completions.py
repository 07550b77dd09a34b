"""One API call from engine requests to OpenAI-format output.

A `Generation` holds the engine requests behind one call (n candidates for each prompt). The engine thread hands
their updates to the event loop through one asyncio queue (`call_soon_threadsafe`); here they become text with
`TextStream` (stop strings, partial characters), then streaming chunks or a final response. A candidate cut by a
stop string is cancelled in the engine at once, so its slot goes to the next request.

Output objects: `chat.completion(.chunk)` and `text_completion` as OpenAI defines them, plus on the final
response / final usage chunk: `tier`, `cost` (USD) and `ultraspeed` (speed, acceptance, best-of-N verdicts).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.engine.scheduler import Engine, EngineRequest, Update
from ultraspeed.engine.text_stream import TextStream
from ultraspeed.server.billing import Prices, request_cost, usage
from ultraspeed.server.metrics import Metrics
from ultraspeed.server.tiers import Tier
from ultraspeed.server.verifier import BestOf
from ultraspeed.tokenizer import Tokenizer


class GenerationTimeout(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class GenerationFailed(Exception):
    pass


TIMEOUT_MESSAGES = {
    "idle": "no tokens were produced for too long; the connection was idle",
    "request": "the call reached its maximum duration",
    "session": "the trial session of this API key ended",
}


@dataclass(frozen=True)
class Deadline:
    """When a call must end (perf_counter time) and which limit that is: "request" (per call) or "session"
    (the API key's trial session), whichever comes first."""

    at: float = math.inf
    kind: str = "request"

    @classmethod
    def earliest(cls, request_end: float, session_end: float) -> "Deadline":
        return cls(session_end, "session") if session_end < request_end else cls(request_end, "request")


@dataclass
class Candidate:
    index: int                      # position among all candidates (prompt_index * n + j)
    prompt_index: int
    stream: TextStream
    request_id: int = -1
    text: str = ""
    tokens: int = 0                 # completion tokens billed (past a stop string: see Generation._apply)
    accepted: list[int] = field(default_factory=list)
    started: bool = False           # the engine admitted it (its prompt was prefilled, or shared a sibling's)
    prefill_tokens: int = 0         # prompt tokens the engine ran for it (0 when it shared a sibling's prefill)
    plain_after: int | None = None  # speculative steps after which the engine switched it to plain decoding
    finish_reason: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Generation:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, metrics: Metrics, tier: Tier, prices: Prices,
                 prompts: list[list[int]], n: int, params: list[SamplingParams], stop: tuple[str, ...]) -> None:
        """params: one SamplingParams per prompt (max_tokens may differ); candidate j gets seed + j."""
        self.engine, self.metrics, self.tier, self.prices = engine, metrics, tier, prices
        self.prompts, self.n = prompts, n
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.candidates = [Candidate(p * n + j, p, TextStream(tokenizer, stop))
                           for p in range(len(prompts)) for j in range(n)]
        self._params = params
        self._stop_ids = tokenizer.stop_token_ids
        self._queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.outcome = "ok"
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Submit every candidate (all or none). Raises the engine's QueueFull / EngineStopped."""
        requests = []
        for c in self.candidates:
            p = self._params[c.prompt_index]
            seed = None if p.seed is None else p.seed + (c.index - c.prompt_index * self.n)
            params = SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                    max_tokens=p.max_tokens, seed=seed, ignore_eos=p.ignore_eos)
            requests.append(EngineRequest(self.prompts[c.prompt_index], params, self._forward(c.index),
                                          group=self.tier.name, stop_ids=self._stop_ids))
        for c, request_id in zip(self.candidates, self.engine.submit(requests)):
            c.request_id = request_id

    def _forward(self, index: int):
        queue, loop = self._queue, self._loop

        def on_update(update: Update) -> None:      # engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, update))
            except RuntimeError:                    # the event loop is gone (server stopped): nobody to tell
                pass
        return on_update

    def cancel(self, outcome: str | None = None) -> None:
        """Stop every unfinished candidate in the engine (frees their slots at the next token boundary)."""
        for c in self.candidates:
            if not c.done and c.request_id >= 0:
                self.engine.cancel(c.request_id)
                c.finish_reason = c.finish_reason or "cancelled"
        if outcome and self.outcome == "ok":
            self.outcome = outcome

    def close(self) -> None:
        """Once, when the call ends however it ends: cancel leftovers, record metrics."""
        if self._closed:
            return
        self._closed = True
        if any(not c.done for c in self.candidates):
            self.cancel("cancelled")
        if any(c.error for c in self.candidates):
            self.outcome = "error"
        u = self.usage()
        self.metrics.finished(self.tier.name, self.outcome, u["prompt_tokens"], u["completion_tokens"], self.cost())

    # -- updates ---------------------------------------------------------------------------------------------

    async def updates(self, idle_s: float, deadline: Deadline) -> AsyncIterator[tuple[Candidate, str]]:
        """(candidate, new text) as tokens arrive, until every candidate is done. `idle_s`: longest wait for the
        next token; `deadline`: when the whole call must end. Raises GenerationTimeout."""
        while not all(c.done for c in self.candidates):
            remaining = deadline.at - time.perf_counter()
            if remaining <= 0:
                raise self._timeout(deadline.kind)
            wait = min(idle_s, remaining)
            try:
                index, update = await asyncio.wait_for(self._queue.get(), wait if math.isfinite(wait) else None)
            except asyncio.TimeoutError:
                raise self._timeout(deadline.kind if time.perf_counter() >= deadline.at else "idle") from None
            c = self.candidates[index]
            if c.done:              # late tokens of a candidate a stop string already ended
                continue
            yield c, self._apply(c, update)

    def _timeout(self, kind: str) -> GenerationTimeout:
        self.cancel("timeout")
        return GenerationTimeout(f"{kind}_timeout", TIMEOUT_MESSAGES[kind])

    def _apply(self, c: Candidate, update: Update) -> str:
        now = time.perf_counter()
        if update.token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
                self.metrics.first_token(self.tier.name, now - self.arrived)
            self.last_token_at = now
            c.started = True
            c.tokens += len(update.token_ids)
            self.metrics.tokens(self.tier.name, len(update.token_ids), update.accepted)
        if update.accepted:
            c.accepted.append(update.accepted)
        if update.stats is not None:
            c.prefill_tokens, c.plain_after = update.stats.prefill_tokens, update.stats.plain_after
        delta = c.stream.feed(update.token_ids)
        if c.stream.stopped:
            c.tokens -= len(c.stream.ids) - c.stream.stop_tokens      # what a plain decode would have made
            c.finish_reason = "stop"
            self.engine.cancel(c.request_id)
        elif update.error:
            c.error = update.error
        elif update.done:
            delta += c.stream.flush()
            c.finish_reason = update.finish_reason
        c.text += delta
        return delta

    async def run_to_end(self, idle_s: float, deadline: Deadline) -> None:
        async for _ in self.updates(idle_s, deadline):
            pass

    def raise_if_failed(self) -> None:
        errors = [c.error for c in self.candidates if c.error]
        if errors:
            raise GenerationFailed(errors[0])

    # -- accounting ------------------------------------------------------------------------------------------

    def usage(self) -> dict:
        """Prompts that reached the engine (a call cancelled while queued costs nothing), and the completion
        tokens of every candidate up to its end (a stop string's surplus excluded: see Candidate.tokens)."""
        started = {c.prompt_index for c in self.candidates if c.started}
        return usage(sum(len(self.prompts[p]) for p in started), sum(c.tokens for c in self.candidates))

    def cost(self) -> float:
        u = self.usage()
        return request_cost(self.prices, self.tier.price_multiplier, u["prompt_tokens"], u["completion_tokens"])

    def extension(self, best_of: list[BestOf | None] | None = None) -> dict:
        accepted = [a for c in self.candidates for a in c.accepted]
        tokens = sum(c.tokens for c in self.candidates)
        decode_s = (self.last_token_at - self.first_token_at) if self.first_token_at is not None else 0.0
        ext = {
            "tier": self.tier.name,
            "speculative": self.tier.speculative and self.engine.speculative,
            "price_multiplier": self.tier.price_multiplier,
            "mean_accepted": round(sum(accepted) / len(accepted), 3) if accepted else 1.0,
            "time_to_first_token_s": round(self.first_token_at - self.arrived, 4)
            if self.first_token_at is not None else None,
            # decode speed after the first token, over all candidates of the call
            "tokens_per_s": round((tokens - len(self.candidates)) / decode_s, 2) if decode_s > 0 else None,
            # prompt tokens actually prefilled: the n candidates of a prompt share one prefill when admitted together
            "prefill_tokens": sum(c.prefill_tokens for c in self.candidates),
            # candidates the drafter did not help, finished with plain decoding (EngineConfig.min_accepted)
            "plain_fallbacks": sum(c.plain_after is not None for c in self.candidates),
        }
        if best_of is not None:
            ext["best_of"] = [None if b is None else {"prompt_index": p, "winner": b.winner, "reason": b.reason,
                                                      "candidates": [v.as_dict() for v in b.verdicts]}
                              for p, b in enumerate(best_of)]
        return ext


# -- OpenAI output objects -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    """The differences between /v1/chat/completions and /v1/completions output."""

    chat: bool
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict:
        if self.chat:
            obj, prefix = ("chat.completion.chunk" if chunk else "chat.completion"), "chatcmpl-"
        else:
            obj, prefix = "text_completion", "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model}

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def response(self, choices: list[dict], gen: Generation, best_of=None) -> dict:
        return {**self._head(False), "choices": choices, "usage": gen.usage(), "tier": gen.tier.name,
                "cost": gen.cost(), "ultraspeed": gen.extension(best_of)}

    def chunk(self, choices: list[dict], extension: dict | None = None) -> dict:
        out = {**self._head(True), "choices": choices}
        if extension is not None:
            out["ultraspeed"] = extension
        return out

    def usage_chunk(self, gen: Generation, best_of=None) -> dict:
        return {**self._head(True), "choices": [], "usage": gen.usage(), "tier": gen.tier.name, "cost": gen.cost(),
                "ultraspeed": gen.extension(best_of)}


def openai_finish_reason(c: Candidate) -> str | None:
    # "cancelled" never reaches a client that is still listening, except through a timeout, which ends the
    # stream with an error event instead; OpenAI knows only "stop" and "length".
    return c.finish_reason if c.finish_reason in ("stop", "length") else None
