"""The OpenAI-compatible API through the official `openai` client against a live uvicorn server: chat and text
completions, streaming and not, n, stop strings, seeds, both tiers; plus models, health, metrics, OpenAPI and the
playground page. Greedy outputs are checked token for token against single-sequence decoding."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.server.conftest import EOS
from ultraspeed.engine.generate import generate_plain
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.server.billing import Prices, request_cost

openai = pytest.importorskip("openai")

TIERS = {"tiny": 1.0, "tiny-ultraspeed": 3.0}


def expected(tiny, prompt_ids, max_tokens):
    """What greedy decoding must produce: the ids and the text a client sees (EOS stops and is not shown)."""
    ids = sum(generate_plain(tiny.model, prompt_ids, SamplingParams(max_tokens=max_tokens), (EOS,)), [])
    return ids, tiny.tokenizer.decode(ids)


def chat_ids(tiny, content):
    return tiny.tokenizer.encode_chat([{"role": "user", "content": content}])


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("model", list(TIERS))
def test_chat_non_streaming(tiny, client, model):
    resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=12, temperature=0)
    ids, text = expected(tiny, chat_ids(tiny, "Hello"), 12)
    choice = resp.choices[0]
    assert choice.message.content == text and choice.message.role == "assistant"
    assert choice.finish_reason == ("stop" if ids[-1] == EOS else "length")
    assert resp.usage.prompt_tokens == len(chat_ids(tiny, "Hello")) and resp.usage.completion_tokens == len(ids)
    extra = resp.model_extra
    assert extra["tier"] == ("ultraspeed" if model.endswith("ultraspeed") else "standard")
    assert extra["cost"] == pytest.approx(request_cost(Prices(), TIERS[model], resp.usage.prompt_tokens,
                                                       resp.usage.completion_tokens))
    assert extra["ultraspeed"]["speculative"] == model.endswith("ultraspeed")


@pytest.mark.parametrize("model", list(TIERS))
def test_chat_streaming_ends_with_usage_chunk(tiny, client, model):
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Stream me"}],
                                                 max_tokens=20, temperature=0, stream=True))
    ids, text = expected(tiny, chat_ids(tiny, "Stream me"), 20)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop" if ids[-1] == EOS else "length"]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == len(ids)
    assert last.model_extra["tier"] in ("standard", "ultraspeed") and last.model_extra["cost"] > 0
    assert last.model_extra["ultraspeed"]["mean_accepted"] >= 1.0
    quiet = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Stream me"}],
                                                max_tokens=20, temperature=0, stream=True,
                                                stream_options={"include_usage": False}))
    assert all(c.choices for c in quiet) and all(c.usage is None for c in quiet)      # opted out: no usage chunk


@pytest.mark.parametrize("model", list(TIERS))
def test_text_completions_stream_and_not(tiny, client, model):
    prompt = "The quick brown fox"
    ids, text = expected(tiny, tiny.tokenizer.encode(prompt), 10)
    resp = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text == text
    assert resp.usage.completion_tokens == len(ids)
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_completions_token_prompts_and_several_prompts(tiny, client):
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    resp = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    for c in resp.choices:
        assert c.text == expected(tiny, prompts[c.index // 2], 6)[1]
    assert resp.usage.prompt_tokens == 7      # each prompt counted once, as OpenAI does


def test_n_choices_seed_and_stop(tiny, client):
    msgs = [{"role": "user", "content": "Sample"}]
    a = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=1.0, seed=7, n=3)
    b = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1       # candidate i samples with seed + i
    # the 3 candidates were admitted together (4 slots): one prefill, two copies of its cache row
    assert a.model_extra["ultraspeed"]["prefill_tokens"] == a.usage.prompt_tokens
    assert 3 <= a.usage.completion_tokens <= 24
    # A stop string taken from the greedy output cuts it right before the stop string.
    _, text = expected(tiny, chat_ids(tiny, "Stop here"), 30)
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isprintable()
                 and text[i:i + 2] not in text[:i + 1]), None)
    if stop is None:
        pytest.skip("greedy output has no usable stop string")
    for stream in (False, True):
        got = client.chat.completions.create(model="tiny-ultraspeed", messages=[{"role": "user", "content": "Stop here"}],
                                             max_tokens=30, temperature=0, stop=[stop], stream=stream)
        if stream:
            chunks = list(got)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        else:
            content, reason = got.choices[0].message.content, got.choices[0].finish_reason
        assert content == text[:text.index(stop)] and reason == "stop"


def test_models_health_metrics_openapi_and_playground(server):
    models = httpx.get(server.url + "/v1/models").json()
    by_id = {m["id"]: m for m in models["data"]}
    assert set(by_id) == set(TIERS)
    assert by_id["tiny-ultraspeed"]["price_per_million_tokens"]["output"] == pytest.approx(
        3 * by_id["tiny"]["price_per_million_tokens"]["output"])
    assert by_id["tiny-ultraspeed"]["max_concurrent_requests"] < by_id["tiny"]["max_concurrent_requests"]
    assert httpx.get(server.url + "/v1/models/tiny").json()["tier"] == "standard"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"

    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for family in ("ultraspeed_tokens_per_second", "ultraspeed_queue_depth", "ultraspeed_acceptance_length_bucket",
                   "ultraspeed_time_to_first_token_seconds_bucket", "ultraspeed_cost_usd_total"):
        assert re.search(rf'^{family}{{tier="ultraspeed"', metrics.text, re.M), family
    # Every sample line is "name{labels} number".
    for line in metrics.text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+\{[^}]*\} [-+0-9.e]+|[a-z_]+\{[^}]*\} \+?Inf', line), line

    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(spec["paths"])

    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and "tokens/s" in page.text
    assert not re.search(r'(src|href)=["\']?(https?:)?//', page.text), "the playground must not load external files"


def test_static_runtime_serves_both_tiers(tiny):
    """A server whose engine runs on the static steps (ServerConfig.runtime, `serve --runtime static`): greedy
    answers of both tiers are exactly single-sequence greedy, streamed or not, and seeded sampling repeats."""
    from tests.server.conftest import run_server
    with run_server(tiny.model, tiny.tokenizer, tiny.drafter, runtime="static") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        want = expected(tiny, chat_ids(tiny, "Static"), 12)[1]
        msgs = [{"role": "user", "content": "Static"}]
        for model in TIERS:
            got = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
            assert got.choices[0].message.content == want
            chunks = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0,
                                                    stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
            a, b = (client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=1.0,
                                                   seed=3).choices[0].message.content for _ in range(2))
            assert a == b
        assert server.state.engines["standard"].config.runtime == "static"
