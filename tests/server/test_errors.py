"""Every malformed request gets a clear 4xx with an OpenAI-style body, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import ScriptedModel, run_server

openai = pytest.importorskip("openai")

CHAT = "/v1/chat/completions"
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

CASES = [
    # (name, path, body or raw bytes, status, param, code)
    ("malformed JSON", CHAT, b'{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    ("body not an object", CHAT, [1, 2], 400, None, None),
    ("no body", CHAT, b"", 400, None, None),
    ("unknown model", CHAT, {**OK_CHAT, "model": "gpt-9"}, 404, "model", "model_not_found"),
    ("negative max_tokens", CHAT, {**OK_CHAT, "max_tokens": -5}, 400, "max_tokens", None),
    ("max_tokens as string", CHAT, {**OK_CHAT, "max_tokens": "10"}, 400, "max_tokens", "invalid_type"),
    ("temperature as string", CHAT, {**OK_CHAT, "temperature": "0.5"}, 400, "temperature", "invalid_type"),
    ("temperature too high", CHAT, {**OK_CHAT, "temperature": 3}, 400, "temperature", None),
    ("top_p zero", CHAT, {**OK_CHAT, "top_p": 0}, 400, "top_p", None),
    ("messages missing", CHAT, {"model": "tiny"}, 400, "messages", None),
    ("messages empty", CHAT, {**OK_CHAT, "messages": []}, 400, "messages", None),
    ("bad role", CHAT, {**OK_CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", None),
    ("content wrong type", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content", None),
    ("n as bool", CHAT, {**OK_CHAT, "n": True}, 400, "n", "invalid_type"),
    ("n too large", CHAT, {**OK_CHAT, "n": 17}, 400, "n", None),
    ("too many stops", CHAT, {**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("prompt too long", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "x" * 300}]}, 400, "messages",
     "context_length_exceeded"),
    ("prompt + max_tokens too long", CHAT, {**OK_CHAT, "max_tokens": 250}, 400, "messages",
     "context_length_exceeded"),
    ("verifier disabled", CHAT, {**OK_CHAT, "n": 2, "verifier": {"type": "python_tests", "tests": "assert 1"}}, 400,
     "verifier", "verifier_disabled"),
    ("completion prompt wrong type", "/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, 400, "prompt", None),
    ("completion token out of vocab", "/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt",
     "invalid_token_id"),
    ("completion empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "empty_prompt"),
    ("logprobs asked for", CHAT, {**OK_CHAT, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ("tools asked for", CHAT, {**OK_CHAT, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter"),
    ("echo asked for", "/v1/completions", {"model": "tiny", "prompt": "a", "echo": True}, 400, "echo",
     "unsupported_parameter"),
    ("seed beyond 64 bits", CHAT, {**OK_CHAT, "seed": 2 ** 64}, 400, "seed", None),
    ("image content part", CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages.0.content", None),
    ("tool_choice required", CHAT, {**OK_CHAT, "tool_choice": "required"}, 400, "tool_choice",
     "unsupported_parameter"),
    ("best_of asked for", "/v1/completions", {"model": "tiny", "prompt": "a", "best_of": 3}, 400, "best_of",
     "unsupported_parameter"),
    ("logprobs 0 on completions", "/v1/completions", {"model": "tiny", "prompt": "a", "logprobs": 0}, 400,
     "logprobs", "unsupported_parameter"),
    ("more prompts x n than the queue", "/v1/completions", {"model": "tiny", "prompt": ["a"] * 9, "n": 8}, 400,
     "prompt", "invalid_value"),
    ("unknown route", "/v1/nothing", {}, 404, None, None),
]


@pytest.mark.parametrize("name,path,body,status,param,code", CASES, ids=[c[0] for c in CASES])
def test_error_is_openai_shaped_and_server_survives(server, name, path, body, status, param, code):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        if isinstance(body, bytes):
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and len(error["message"]) > 5
        assert error["type"] in ("invalid_request_error", "not_found_error")
        if param is not None:
            assert error["param"] == param
        if code is not None:
            assert error["code"] == code
        ok = http.post(CHAT, json=OK_CHAT)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_neutral_values_of_unimplemented_parameters_are_accepted(server):
    r = httpx.post(server.url + CHAT, json={**OK_CHAT, "logprobs": False, "frequency_penalty": 0,
                                           "response_format": {"type": "text"}, "user": "me",
                                           "tool_choice": "none", "best_of": 1}, timeout=30)
    assert r.status_code == 200


def test_null_means_the_default(server):
    """OpenAI declares its optional parameters nullable; clients that serialise unset fields send null."""
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "stop", "seed", "top_k", "ignore_eos",
                           "stream_options", "logprobs", "tools"])
    r = httpx.post(server.url + CHAT, json={**OK_CHAT, **nulls}, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_tiny_temperature_and_top_p_decode_greedily_and_harm_no_one(server):
    greedy = httpx.post(server.url + CHAT, json={**OK_CHAT, "temperature": 0, "max_tokens": 8}, timeout=30).json()
    for extra in ({"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-300}):
        for model in ("tiny", "tiny-ultraspeed"):
            r = httpx.post(server.url + CHAT, json={**OK_CHAT, **extra, "model": model, "max_tokens": 8}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


def test_huge_text_is_refused_before_it_is_tokenized(server):
    limit = 256 * server.state.tokenizer.max_token_bytes
    r = httpx.post(server.url + CHAT, json={**OK_CHAT, "messages": [{"role": "user", "content": "x" * (limit + 1)}]},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "bytes of text" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": ["a", "y" * (limit + 1)]},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_error_messages_name_the_cause(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.post(CHAT, content=b'{"model": "tiny"}', headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
        r = http.post(CHAT, json={**OK_CHAT, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]})
        assert "only text content parts" in r.json()["error"]["message"]
        full = "x" * (256 - len(server.state.tokenizer.encode_chat([{"role": "user", "content": ""}])))
        r = http.post(CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": full}]})
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and "alone has 256 tokens" in message and "requested" not in message


def test_engine_failure_is_a_500_or_an_error_event_and_the_server_recovers(tiny):
    model = ScriptedModel({"\n": {"a": 1.0}, "a": {"a": 1.0}})
    with run_server(model, tiny.tokenizer) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        model.fail = True
        r = http.post(CHAT, json=OK_CHAT)
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        model.fail = True
        with http.stream("POST", CHAT, json={**OK_CHAT, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert '"generation_failed"' in lines[-2] and lines[-1] == "data: [DONE]"
        assert http.post(CHAT, json=OK_CHAT).json()["choices"][0]["message"]["content"] == "aaa"
        assert 'outcome="error"} 2' in http.get("/metrics").text


def test_openai_client_raises_typed_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 400}])
    assert e.value.code == "context_length_exceeded" and "maximum context length is 256" in e.value.message
