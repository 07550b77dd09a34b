"""Under concurrency: no response lost or mixed up, usage and cost add up to what /metrics billed; a client that
hangs up mid-stream frees its slot at once; shutdown drains the streams in flight."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import pytest

from tests.server.conftest import EOS, run_server
from ultraspeed.engine.generate import generate_plain
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.server.billing import Prices, request_cost

openai = pytest.importorskip("openai")

STREAMS = 32


def metric(text: str, name: str, tier: str) -> float:
    return float(re.search(rf'^{name}{{tier="{tier}"}} (\S+)$', text, re.M).group(1))


def test_concurrent_streams_are_complete_separate_and_billed_right(tiny, server):
    prompts = [f"Request number {i}: {'xyz'[i % 3] * (i % 7)}" for i in range(STREAMS)]
    models = ["tiny" if i % 3 else "tiny-ultraspeed" for i in range(STREAMS)]
    max_tokens = [6 + i % 11 for i in range(STREAMS)]
    expected = []
    for p, m in zip(prompts, max_tokens):
        ids = tiny.tokenizer.encode_chat([{"role": "user", "content": p}])
        out = sum(generate_plain(tiny.model, ids, SamplingParams(max_tokens=m), (EOS,)), [])
        expected.append((len(ids), out, tiny.tokenizer.decode(out)))
    before = httpx.get(server.url + "/metrics").text

    async def one(client, i):
        stream = await client.chat.completions.create(
            model=models[i], messages=[{"role": "user", "content": prompts[i]}], max_tokens=max_tokens[i],
            temperature=0, stream=True)
        text, usage_chunk = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            else:
                usage_chunk = chunk
        return text, usage_chunk

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(STREAMS)))

    results = asyncio.run(all_of_them())
    billed = {"standard": 0.0, "ultraspeed": 0.0}
    tokens = {"standard": 0, "ultraspeed": 0}
    for i, ((text, last), (n_prompt, ids, want)) in enumerate(zip(results, expected)):
        assert text == want, f"stream {i} got someone else's or a corrupted completion"
        assert last.usage.prompt_tokens == n_prompt and last.usage.completion_tokens == len(ids)
        tier = last.model_extra["tier"]
        assert tier == ("ultraspeed" if models[i].endswith("ultraspeed") else "standard")
        multiplier = 3.0 if tier == "ultraspeed" else 1.0
        assert last.model_extra["cost"] == pytest.approx(request_cost(Prices(), multiplier, n_prompt, len(ids)))
        billed[tier] += last.model_extra["cost"]
        tokens[tier] += len(ids)
    after = httpx.get(server.url + "/metrics").text
    for tier in billed:
        assert metric(after, "ultraspeed_cost_usd_total", tier) - metric(before, "ultraspeed_cost_usd_total", tier) \
            == pytest.approx(billed[tier])
        assert metric(after, "ultraspeed_completion_tokens_total", tier) \
            - metric(before, "ultraspeed_completion_tokens_total", tier) == tokens[tier]
    assert server.state.queue_depth() == 0
    assert all(v["running"] == 0 for v in server.state.snapshot().values())


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.parametrize("model", ["tiny", "tiny-ultraspeed"])
def test_disconnect_mid_stream_frees_the_slot(server, model):
    state = server.state
    tier = "ultraspeed" if model.endswith("ultraspeed") else "standard"
    body = {"model": model, "messages": [{"role": "user", "content": "long"}], "max_tokens": 230,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            seen = [next(lines) for _ in range(6)]      # role chunk + a few tokens
            assert state.snapshot()[tier]["running"] == 1
        assert any('"content"' in line for line in seen)
    wait_until(lambda: state.snapshot()[tier]["running"] == 0, timeout=5)
    text = httpx.get(server.url + "/metrics").text
    assert re.search(rf'ultraspeed_requests_total{{tier="{tier}",outcome="cancelled"}} [1-9]', text)
    # The slot is usable at once.
    r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_graceful_shutdown_drains_streams_in_flight(tiny):
    with run_server(tiny.model, tiny.tokenizer, tiny.drafter) as running:
        body = {"model": "tiny-ultraspeed", "messages": [{"role": "user", "content": "drain"}], "max_tokens": 120,
                "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.Client(base_url=running.url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                next(lines)
                stopper = threading.Thread(target=running.stop)
                stopper.start()                           # SIGTERM equivalent: uvicorn starts shutting down
                rest = [line for line in lines if line.startswith("data: ")]
        stopper.join(30)
        assert rest[-1] == "data: [DONE]" and '"usage"' in rest[-2] and '"completion_tokens": 120' in rest[-2]
        assert not running.thread.is_alive() and not running.state.alive
        with pytest.raises(httpx.ConnectError):
            httpx.get(running.url + "/health", timeout=2)
