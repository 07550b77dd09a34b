"""The OpenAI-compatible HTTP server (FastAPI): routes, request validation, limits, and the engine's lifecycle.

    GET  /                      playground (static/index.html)
    GET  /health                200 while serving, 503 while draining or if the engine thread died
    GET  /metrics               Prometheus text (per tier: tokens/s, queue depth, TTFT, acceptance length, cost)
    GET  /v1/models[/{id}]      the two tiers as model ids, with prices and capacity
    POST /v1/chat/completions   chat, stream or not, n, verifier (best-of-N)
    POST /v1/completions        raw prompts (text or token ids), same options
    GET  /openapi.json, /docs   from FastAPI

Streams are Server-Sent Events: `data: {chunk}` lines, then a final usage chunk (`choices: []`, `usage`,
`tier`, `cost`, `ultraspeed`; sent unless the client sets `stream_options.include_usage: false`, because the cost
should reach the client), then `data: [DONE]`. A failure after the stream started is one `data: {"error": {...}}` event
followed by `data: [DONE]`.

Each engine runs in its own thread (started and drained by the app's lifespan); this module never blocks the
event loop on it. All state lives in one `ServerState` passed to `create_app`; nothing is global.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.engine.scheduler import Engine, EngineConfig, EngineStopped, QueueFull
from ultraspeed.errors import UltraSpeedError
from ultraspeed.server.billing import Prices
from ultraspeed.server.completions import (Deadline, Format, Generation, GenerationFailed, GenerationTimeout,
                                           openai_finish_reason)
from ultraspeed.server.errors import APIError, error_body, install_error_handlers
from ultraspeed.server.limits import KeyQuota, LimitsConfig, TrialSessions, bearer_token
from ultraspeed.server.metrics import Metrics
from ultraspeed.server.schemas import ChatCompletionRequest, CompletionRequest, VerifierSpec
from ultraspeed.server.tiers import Tier, make_tiers
from ultraspeed.server.verifier import BestOf, VerifierConfig, check_tests, pick_best
from ultraspeed.tokenizer import Tokenizer

STATIC = Path(__file__).with_name("static")
MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "default"
    standard_max_running: int = 8         # concurrent requests of the standard tier
    ultraspeed_max_running: int = 2       # ... of the ultraspeed tier (its capacity is deliberately small)
    ultraspeed_multiplier: float = 3.0    # its price relative to standard
    max_queue: int = 64                   # waiting requests per engine before 503 (one engine per tier with MXFP4)
    max_len: int = 2048                   # context served: prompt + completion tokens per request
    max_n: int = 16                       # candidates per prompt
    prices: Prices = field(default_factory=Prices)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    drain_seconds: float = 60.0           # graceful shutdown: how long in-flight requests may still run
    min_accepted: float | None = 0.0      # ultraspeed requests whose drafter commits fewer tokens per step than
                                          # this (after 4 probe steps) finish with plain decoding; 0 = never,
                                          # None = the break-even of the measured step costs
    adaptive_verify: bool = True          # verify only the drafts worth their time (EngineConfig.adaptive_verify)
    lookup: bool = True                   # lookup drafts where the context repeats (EngineConfig.lookup)
    engine_threads: int = 0               # CPU threads of each engine's thread (EngineConfig.threads)
    runtime: str = "dynamic"              # "static": lanes replay captured steps (EngineConfig.runtime)

    def __post_init__(self) -> None:
        if min(self.standard_max_running, self.ultraspeed_max_running, self.max_queue, self.max_n) < 1:
            raise ValueError("capacities, max_queue and max_n must be >= 1")
        if self.max_n > self.max_queue:   # n candidates are queued together: more could never be accepted
            raise ValueError(f"max_n ({self.max_n}) must not exceed max_queue ({self.max_queue})")


@dataclass
class ServerState:
    config: ServerConfig
    engines: dict[str, Engine]            # by tier name; both tiers share one engine unless their weights differ
    tokenizer: Tokenizer
    tiers: dict[str, Tier]                # by model id
    metrics: Metrics
    quota: KeyQuota
    sessions: TrialSessions
    accepting: bool = True

    def unique_engines(self) -> list[Engine]:
        return list({id(e): e for e in self.engines.values()}.values())

    def queue_depth(self) -> int:
        return sum(e.queue_depth() for e in self.unique_engines())

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Waiting and running requests per tier."""
        return {tier: engine.snapshot()[tier] for tier, engine in self.engines.items()}

    @property
    def alive(self) -> bool:
        return all(e.alive for e in self.unique_engines())


def build_state(model, tokenizer: Tokenizer, drafter, config: ServerConfig, ultraspeed_model=None,
                lookup_corpus=None) -> ServerState:
    """Wire the engines (not started: the app's lifespan starts them) and the bookkeeping.

    With `ultraspeed_model` (the same model with MXFP4 experts) each tier gets its own engine, the way the
    ultraspeed product is its own deployment: its own weights, drafter, batch and capacity. Without it, one engine
    serves both tiers as two scheduling groups over the same weights. `lookup_corpus` (engine/lookup_corpus.py)
    goes to the engine with the drafter."""
    standard, ultraspeed = make_tiers(config.model_name, config.standard_max_running, config.ultraspeed_max_running,
                                      config.ultraspeed_multiplier,
                                      "mxfp4" if ultraspeed_model is not None else "original")

    def engine(target, tiers: tuple[Tier, ...], with_drafter) -> Engine:
        return Engine(target, EngineConfig(groups=tuple(t.group() for t in tiers), max_len=config.max_len,
                                           max_queue=config.max_queue, min_accepted=config.min_accepted,
                                           adaptive_verify=config.adaptive_verify, lookup=config.lookup,
                                           threads=config.engine_threads, runtime=config.runtime),
                      with_drafter, lookup_corpus if with_drafter is not None else None)
    if ultraspeed_model is None:
        shared = engine(model, (standard, ultraspeed), drafter)
        engines = {"standard": shared, "ultraspeed": shared}
    else:
        engines = {"standard": engine(model, (standard,), None),
                   "ultraspeed": engine(ultraspeed_model, (ultraspeed,), drafter)}
    tiers = (standard, ultraspeed)
    return ServerState(config, engines, tokenizer, {t.model_id: t for t in tiers}, Metrics([t.name for t in tiers]),
                       KeyQuota(config.limits.max_queued_per_key), TrialSessions(config.limits.session_seconds))


class AuthMiddleware:
    """Checks the bearer key of every /v1/ request before anything else happens (even JSON parsing), and
    leaves the key in the request state for the per-key quota."""

    def __init__(self, app, keys: frozenset[str]) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and self.keys:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            key = bearer_token(header)
            # compare_digest against every key: the time taken says nothing about how close a guess was
            # (as UTF-8 bytes: compare_digest refuses str with non-ASCII characters)
            if key is None or not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.keys):
                message = ("missing API key: send 'Authorization: Bearer <key>'" if key is None
                           else "incorrect API key provided")
                await APIError(401, message, code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive, send)
                return
            scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


class EventStream(StreamingResponse):
    """SSE response whose `on_close` always runs: stream finished, failed, or client gone (even before the
    first byte, when the body iterator is never started and its own `finally` would never run)."""

    def __init__(self, events: AsyncIterator[dict | str], on_close: Callable[[], None]) -> None:
        super().__init__(_sse(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _sse(events: AsyncIterator[dict | str]) -> AsyncIterator[str]:
    async for event in events:
        yield f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"


def create_app(state: ServerState) -> FastAPI:
    cfg = state.config

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        for engine in state.unique_engines():
            engine.start()
        yield
        # uvicorn has already stopped accepting connections and waited for in-flight ones; finish what the
        # engine still holds, in a thread so the loop can deliver their last updates meanwhile.
        state.accepting = False
        await asyncio.gather(*(asyncio.to_thread(e.stop, True, cfg.drain_seconds) for e in state.unique_engines()))

    app = FastAPI(title="UltraSpeed", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API with a standard and an ultraspeed (speculative) tier.")
    app.add_middleware(AuthMiddleware, keys=cfg.limits.api_keys)
    install_error_handlers(app)
    playground = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.accepting and state.alive
        return JSONResponse({"status": "ok" if ok else ("draining" if not state.accepting else "engine_down"),
                             "queue_depth": state.queue_depth(),
                             "speculative": state.engines["ultraspeed"].speculative,
                             "models": list(state.tiers)}, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> PlainTextResponse:
        text = state.metrics.render(state.snapshot(), state.queue_depth())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def model_card(t: Tier) -> dict:
        p, engine = cfg.prices, state.engines[t.name]
        return {"id": t.model_id, "object": "model", "created": 0, "owned_by": "ultraspeed", "tier": t.name,
                "speculative": t.speculative and engine.speculative, "experts": t.experts,
                "max_concurrent_requests": t.max_running, "context_length": engine.context_limit,
                "price_per_million_tokens": {"input": round(p.input_per_million * t.price_multiplier, 9),
                                             "output": round(p.output_per_million * t.price_multiplier, 9)}}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(t) for t in state.tiers.values()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        return model_card(tier_of(model_id))

    def tier_of(model_id: str) -> Tier:
        if model_id not in state.tiers:
            raise APIError(404, f"the model '{model_id}' does not exist; available: {', '.join(state.tiers)}",
                           code="model_not_found", param="model")
        return state.tiers[model_id]

    def check_text_size(texts: list[str], tier: Tier, param: str) -> None:
        """Refuse text that cannot fit the context before tokenizing it (which takes seconds per megabyte): no
        tokenization gives fewer tokens than UTF-8 bytes over the longest token's bytes."""
        context = state.engines[tier.name].context_limit
        size = sum(len(t.encode()) for t in texts)
        if size > context * state.tokenizer.max_token_bytes:
            raise APIError(400, f"This model's maximum context length is {context} "
                                f"tokens, and the {param} holds {size:,} bytes of text: more tokens than that "
                                f"whatever they are. Please reduce the length of the {param}.",
                           code="context_length_exceeded", param=param)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        tier = tier_of(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        check_text_size([m["content"] for m in messages], tier, "messages")
        try:   # in a thread: a long prompt must not stall the streams the event loop is serving
            prompt = await asyncio.to_thread(state.tokenizer.encode_chat, messages)
        except UltraSpeedError as e:
            raise APIError(400, str(e), code="invalid_messages", param="messages") from e
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await complete(request, body, tier, [prompt], max_tokens, Format(chat=True, model=body.model),
                              "messages")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        tier = tier_of(body.model)
        prompts = await asyncio.to_thread(completion_prompts, body.prompt, tier)
        return await complete(request, body, tier, prompts, body.max_tokens, Format(chat=False, model=body.model),
                              "prompt")

    def completion_prompts(prompt, tier: Tier) -> list[list[int]]:
        if isinstance(prompt, str):
            check_text_size([prompt], tier, "prompt")
            prompts = [state.tokenizer.encode(prompt)]
        elif prompt and isinstance(prompt[0], str):
            for p in prompt:
                check_text_size([p], tier, "prompt")
            prompts = [state.tokenizer.encode(p) for p in prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        vocab = state.engines["standard"].model.config.vocab_size
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "the prompt is empty", code="empty_prompt", param="prompt")
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise APIError(400, f"token ids must be in [0, {vocab})", code="invalid_token_id", param="prompt")
        return prompts

    async def complete(request: Request, body, tier: Tier, prompts: list[list[int]], max_tokens: int | None,
                       fmt: Format, prompt_param: str):
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"'{unsupported}' is not supported by this server", code="unsupported_parameter",
                           param=unsupported)
        params = sampling_params(body, prompts, max_tokens, prompt_param, state.engines[tier.name].context_limit)
        stop = body.stop_strings()
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings", code="invalid_value", param="stop")
        if body.n > cfg.max_n:
            raise APIError(400, f"n must be at most {cfg.max_n}", code="invalid_value", param="n")
        if len(prompts) * body.n > cfg.max_queue:   # queued together: more could never be accepted
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} candidates exceed what this server queues at "
                                f"once ({cfg.max_queue}); send fewer prompts per request", code="invalid_value",
                           param=prompt_param)
        if body.verifier is not None:
            check_verifier(body.verifier)
        if not state.accepting:
            raise APIError(503, "the server is shutting down", code="shutting_down")

        key = request.scope.get("state", {}).get("api_key")
        if time.perf_counter() >= state.sessions.end(key):
            state.metrics.rejected(tier.name, "session_expired")
            raise APIError(429, f"the trial session of this API key has ended (sessions last "
                                f"{cfg.limits.session_seconds / 60:g} minutes from the first call)",
                           code="trial_session_expired", type_="insufficient_quota")
        retry = {"Retry-After": str(cfg.limits.retry_after_seconds)}
        if not state.quota.try_acquire(key):
            state.metrics.rejected(tier.name, "rate_limited")
            raise APIError(429, f"too many requests in flight for this API key (at most "
                                f"{cfg.limits.max_queued_per_key})", code="too_many_queued_requests", headers=retry)
        gen = Generation(state.engines[tier.name], state.tokenizer, state.metrics, tier, cfg.prices, prompts, body.n, params,
                         stop)
        try:
            gen.start()
        except (QueueFull, EngineStopped) as e:
            state.quota.release(key)
            state.metrics.rejected(tier.name, "overloaded")
            code = "overloaded" if isinstance(e, QueueFull) else "shutting_down"
            raise APIError(503, f"the server is busy: {e}", code=code, headers=retry) from e
        except UltraSpeedError as e:
            state.quota.release(key)
            raise APIError(400, str(e), param=prompt_param) from e

        session_end = state.sessions.start(key, gen.arrived)

        def finish() -> None:
            gen.close()
            state.quota.release(key)

        limits = cfg.limits
        deadline = Deadline.earliest(gen.arrived + limits.request_seconds if limits.request_seconds > 0 else math.inf,
                                     session_end)
        idle = limits.idle_seconds if limits.idle_seconds > 0 else math.inf
        if body.stream:
            include_usage = body.stream_options is None or body.stream_options.include_usage
            return EventStream(stream_events(gen, fmt, body.verifier, idle, deadline, include_usage),
                               on_close=finish)
        watcher = asyncio.create_task(cancel_on_disconnect(request, gen))
        try:
            await gen.run_to_end(math.inf, deadline)
            gen.raise_if_failed()
            best_of = await verify(gen, body.verifier) if body.verifier else None
            return JSONResponse(fmt.response(final_choices(gen, fmt, best_of), gen, best_of))
        except GenerationTimeout as e:
            raise APIError(504, str(e), code=e.code) from e
        except GenerationFailed as e:
            raise APIError(500, f"generation failed: {e}", code="generation_failed") from e
        finally:
            watcher.cancel()
            finish()

    def sampling_params(body, prompts: list[list[int]], max_tokens: int | None, prompt_param: str, limit: int):
        out = []
        for p in prompts:
            wanted = len(p) + (max_tokens or 1)
            if wanted > limit:
                asked = (f"you requested {wanted} tokens ({len(p)} in the {prompt_param}, {max_tokens} in the "
                         f"completion)" if max_tokens else
                         f"the {prompt_param} alone has {len(p)} tokens, which leaves no room for a completion")
                raise APIError(400, f"This model's maximum context length is {limit} tokens. However, {asked}. "
                                    f"Please reduce the length of the {prompt_param} or completion.",
                               code="context_length_exceeded", param=prompt_param)
            out.append(SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                      max_tokens=max_tokens or limit - len(p), seed=body.seed,
                                      ignore_eos=body.ignore_eos))
        return out

    def check_verifier(spec: VerifierSpec) -> None:
        if not cfg.verifier.enabled:
            raise APIError(400, "verifiers are disabled on this server (start it with --enable-verifier)",
                           code="verifier_disabled", param="verifier")
        try:
            check_tests(spec.tests)
        except UltraSpeedError as e:
            raise APIError(400, str(e), code="invalid_value", param="verifier.tests") from e

    async def verify(gen: Generation, spec: VerifierSpec) -> list[BestOf]:
        out = []
        for p in range(len(gen.prompts)):
            texts = [c.text for c in gen.candidates if c.prompt_index == p]
            out.append(await pick_best(texts, spec.tests, cfg.verifier, spec.timeout))
        return out

    def final_choices(gen: Generation, fmt: Format, best_of: list[BestOf] | None) -> list[dict]:
        if best_of is None:
            return [fmt.choice(c.index, c.text, openai_finish_reason(c)) for c in gen.candidates]
        winners = [gen.candidates[p * gen.n + b.winner] for p, b in enumerate(best_of)]
        return [fmt.choice(p, c.text, openai_finish_reason(c)) for p, c in enumerate(winners)]

    async def stream_events(gen: Generation, fmt: Format, verifier: VerifierSpec | None, idle: float,
                            deadline: Deadline, include_usage: bool) -> AsyncIterator[dict | str]:
        indices = range(len(gen.prompts)) if verifier else [c.index for c in gen.candidates]
        if fmt.chat:
            for i in indices:
                yield fmt.chunk([fmt.chunk_choice(i, None, None, role=True)])
        best_of = None
        try:
            if verifier:    # the winner is known only at the end: generate all, verify, send the winner whole
                await gen.run_to_end(idle, deadline)
                gen.raise_if_failed()
                best_of = await verify(gen, verifier)
                for choice in final_choices(gen, fmt, best_of):
                    text = choice["message"]["content"] if fmt.chat else choice["text"]
                    yield fmt.chunk([fmt.chunk_choice(choice["index"], text, choice["finish_reason"])])
            else:
                async for c, delta in gen.updates(idle, deadline):
                    if c.error:
                        raise GenerationFailed(c.error)
                    finish = openai_finish_reason(c)
                    if delta or finish:
                        mean = sum(c.accepted) / len(c.accepted) if c.accepted else 1.0
                        yield fmt.chunk([fmt.chunk_choice(c.index, delta, finish)],
                                        {"tokens": c.tokens, "mean_accepted": round(mean, 3)})
        except GenerationTimeout as e:
            yield error_body(str(e), "timeout_error", code=e.code)
            yield "[DONE]"
            return
        except GenerationFailed as e:
            yield error_body(f"generation failed: {e}", "server_error", code="generation_failed")
            yield "[DONE]"
            return
        if include_usage:
            yield fmt.usage_chunk(gen, best_of)
        yield "[DONE]"

    async def cancel_on_disconnect(request: Request, gen: Generation) -> None:
        """Non-streaming calls: a client that hangs up stops its generation (the body was read already, so the
        next message can only be the disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gen.cancel("cancelled")
                return

    return app


def model_name_from_source(source: str) -> str:
    """'/x/SmolLM2-135M-Instruct.Q4_1.gguf' -> 'smollm2-135m-instruct'; a model directory -> its name."""
    name = Path(source).name
    if name.endswith(".gguf"):
        name = name[:-len(".gguf")].split(".")[0]
    return name.lower()


def serve(model, tokenizer: Tokenizer, drafter, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", ultraspeed_model=None, lookup_corpus=None) -> None:
    """Run until SIGINT/SIGTERM, then drain: no new connections, in-flight requests finish (up to
    config.drain_seconds), then the engines stop."""
    import uvicorn
    app = create_app(build_state(model, tokenizer, drafter, config, ultraspeed_model, lookup_corpus))
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(config.drain_seconds))
