"""Trial limits: API keys (401), at most 10 calls in flight per key (429 + Retry-After on the 11th, slots come
back when calls end), the idle-stream and per-call time limits, and the per-key trial session. A slow scripted model holds requests in flight
deterministically."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from tests.server.conftest import ScriptedModel, run_server
from ultraspeed.server.limits import LimitsConfig, TrialSessions, bearer_token, load_api_keys

openai = pytest.importorskip("openai")

KEYS = frozenset({"key-alice", "key-bob"})
ENDLESS = {c: {"a": 1.0} for c in "\nab"}        # writes "aaaa..." until max_tokens
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True}


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_load_api_keys_from_file_and_env(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# trial keys\nkey-1\n\n  key-2  \n")
    assert load_api_keys(f, {"ULTRASPEED_API_KEYS": "key-3, key-4,"}) == {"key-1", "key-2", "key-3", "key-4"}
    assert load_api_keys(None, {}) == frozenset()
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None


@pytest.fixture(scope="module")
def keyed(tiny):
    model = ScriptedModel(ENDLESS, delay_s=0.02)
    with run_server(model, tiny.tokenizer, standard_max_running=1,
                    limits=LimitsConfig(api_keys=KEYS, max_queued_per_key=10)) as running:
        yield running


def test_auth_required_for_api_but_not_health(keyed):
    with httpx.Client(base_url=keyed.url) as http:
        body = {**CHAT, "stream": False, "max_tokens": 2}
        for headers in ({}, auth("wrong"), {"Authorization": "key-alice"},
                        {"Authorization": "Bearer \u20ac-key".encode()}):    # non-ASCII: still a plain 401
            r = http.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        # Authentication comes first, even before the body is parsed.
        assert http.post("/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"}
                         ).status_code == 401
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
        assert http.post("/v1/chat/completions", json=body, headers=auth("key-alice")).status_code == 200
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_eleventh_call_in_flight_gets_429_and_slots_come_back(keyed):
    async def scenario():
        async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
            streams = []
            for _ in range(10):     # 1 running + 9 queued (the tier runs one at a time)
                cm = http.stream("POST", "/v1/chat/completions", json=CHAT, headers=auth("key-alice"))
                response = await cm.__aenter__()
                assert response.status_code == 200
                streams.append(cm)
            eleventh = await http.post("/v1/chat/completions", json=CHAT, headers=auth("key-alice"))
            assert eleventh.status_code == 429
            assert eleventh.json()["error"]["code"] == "too_many_queued_requests"
            assert int(eleventh.headers["retry-after"]) >= 1
            # Another key has its own quota (and the other tier its own capacity, so this one runs at once).
            other = await http.post("/v1/chat/completions", headers=auth("key-bob"),
                                    json={**CHAT, "model": "tiny-ultraspeed", "stream": False, "max_tokens": 1})
            assert other.status_code == 200
            for cm in streams:      # hang up: every slot is released
                await cm.__aexit__(None, None, None)
            for _ in range(200):
                if keyed.state.quota.in_flight("key-alice") == 0 and keyed.state.queue_depth() == 0:
                    break
                await asyncio.sleep(0.02)
            assert keyed.state.quota.in_flight("key-alice") == 0
            again = await http.post("/v1/chat/completions", json={**CHAT, "stream": False, "max_tokens": 1},
                                    headers=auth("key-alice"))
            assert again.status_code == 200
    asyncio.run(scenario())


def sse_events(response):
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in response.iter_lines() if line.startswith("data: ")]


def test_idle_stream_and_request_limits(tiny):
    model = ScriptedModel(ENDLESS, delay_s=0.02)
    limits = LimitsConfig(idle_seconds=2.0, request_seconds=3.0)   # 230 tokens take >= 4.6 s
    with run_server(model, tiny.tokenizer, standard_max_running=1, limits=limits) as running:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 230}) as busy:
                assert busy.status_code == 200
                # The only slot is taken: a second stream waits in the queue without tokens and is dropped.
                with http.stream("POST", "/v1/chat/completions", json=CHAT) as idle:
                    events = sse_events(idle)
                assert events[-2]["error"]["code"] == "idle_timeout" and events[-1] == "[DONE]"
                # The first one streams for longer than a call may last: cut with an error event.
                events = sse_events(busy)
            assert events[-2]["error"]["code"] == "request_timeout"
            assert 0 < sum(len(e["choices"][0]["delta"].get("content", "")) for e in events[:-2]) < 230
            # A non-streaming call over the limit is a 504 with an OpenAI-style body.
            r = http.post("/v1/chat/completions", json={**CHAT, "stream": False, "max_tokens": 230})
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
            assert running.state.queue_depth() == 0
            text = http.get("/metrics").text
            assert 'ultraspeed_requests_total{tier="standard",outcome="timeout"} 3' in text


def test_trial_session_starts_at_the_first_accepted_call():
    sessions = TrialSessions(session_seconds=10)
    assert sessions.end("key-alice") == math.inf          # refused calls only look
    assert sessions.start("key-alice", 5.0) == 15.0
    assert sessions.start("key-alice", 9.0) == 15.0       # later calls keep the first end
    assert sessions.end("key-alice") == 15.0 and sessions.end("key-bob") == math.inf
    assert sessions.start(None, 5.0) == math.inf          # an open server has no sessions
    assert TrialSessions(session_seconds=0).start("key-alice", 5.0) == math.inf


def test_trial_session_per_key(tiny):
    """A key's session runs from its first call: a call still streaming when it ends is cut, later calls get
    429 trial_session_expired (no Retry-After: waiting does not help), and another key's session is its own."""
    model = ScriptedModel(ENDLESS, delay_s=0.02)
    limits = LimitsConfig(api_keys=KEYS, session_seconds=1.2, request_seconds=60)
    with run_server(model, tiny.tokenizer, limits=limits) as running:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            refused = http.post("/v1/chat/completions", json={**CHAT, "n": 99}, headers=auth("key-bob"))
            assert refused.status_code == 400                 # ... and does not start bob's session
            with http.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 230},
                             headers=auth("key-alice")) as first:
                assert first.status_code == 200
                events = sse_events(first)
            assert events[-2]["error"]["code"] == "session_timeout" and events[-1] == "[DONE]"
            late = http.post("/v1/chat/completions", json={**CHAT, "stream": False, "max_tokens": 1},
                             headers=auth("key-alice"))
            assert late.status_code == 429 and "retry-after" not in late.headers
            assert late.json()["error"]["code"] == "trial_session_expired"
            assert late.json()["error"]["type"] == "insufficient_quota"
            bob = http.post("/v1/chat/completions", json={**CHAT, "stream": False, "max_tokens": 1},
                            headers=auth("key-bob"))
            assert bob.status_code == 200
            text = http.get("/metrics").text
            assert 'ultraspeed_requests_total{tier="standard",outcome="session_expired"} 1' in text
