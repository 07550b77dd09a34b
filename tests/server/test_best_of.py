"""Best-of-N with a verifier: n sampled candidates run against the request's tests and the passing one is
returned, with the verdicts. A scripted bigram model writes `v=<random digit>`, so some candidates pass
`assert v == 2` and some do not."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import EOS, ScriptedModel, run_server
from ultraspeed.server.verifier import VerifierConfig

PROGRAMS = {"\n": {"v": 1.0}, "v": {"=": 1.0}, "=": {"1": 0.35, "2": 0.3, "3": 0.35}, "1": {EOS: 1.0},
            "2": {EOS: 1.0}, "3": {EOS: 1.0}}
N = 8


@pytest.fixture(scope="module")
def verifying(tiny):
    with run_server(ScriptedModel(PROGRAMS), tiny.tokenizer, max_n=N,
                    verifier=VerifierConfig(enabled=True, timeout_s=10)) as running:
        yield running


def body(**kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": "Set v to two."}], "n": N,
            "temperature": 1.0, "seed": 3, "max_tokens": 8, **kw}


def test_without_verifier_all_candidates_come_back(verifying):
    r = httpx.post(verifying.url + "/v1/chat/completions", json=body(), timeout=60).json()
    texts = [c["message"]["content"] for c in r["choices"]]
    assert len(texts) == N and set(texts) <= {"v=1", "v=2", "v=3"}
    assert "v=2" in texts and len(set(texts)) > 1, "pick another seed: the candidates must differ"


def test_verifier_picks_a_passing_candidate(verifying):
    tests = {"type": "python_tests", "tests": "assert v == 2\nassert isinstance(v, int)"}
    r = httpx.post(verifying.url + "/v1/chat/completions", json=body(verifier=tests), timeout=60).json()
    assert [c["message"]["content"] for c in r["choices"]] == ["v=2"]
    best = r["ultraspeed"]["best_of"][0]
    verdicts = best["candidates"]
    assert len(verdicts) == N and verdicts[best["winner"]]["passed"] == 2
    assert any(v["passed"] < 2 for v in verdicts)
    assert f"candidate {best['winner']} passed all 2 tests" in best["reason"]
    assert r["usage"]["completion_tokens"] == 4 * N        # every candidate is billed: v, =, digit, EOS

    # Streaming: the winner arrives whole once verified, then the usage chunk with the verdicts.
    with httpx.stream("POST", verifying.url + "/v1/chat/completions", json=body(verifier=tests, stream=True),
                      timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert content == "v=2" and events[-1]["ultraspeed"]["best_of"][0]["winner"] == best["winner"]


def test_verifier_with_no_assert_is_rejected_before_generating(verifying):
    r = httpx.post(verifying.url + "/v1/chat/completions",
                   json=body(verifier={"type": "python_tests", "tests": "x = ("}), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "verifier.tests"
    r = httpx.post(verifying.url + "/v1/chat/completions",
                   json=body(verifier={"type": "python_tests", "tests": "print(1)"}), timeout=60)
    assert r.status_code == 400 and "assert" in r.json()["error"]["message"]
