"""The ultraspeed tier with MXFP4 experts: its own engine and weights beside the standard tier's, each tier's
greedy output exactly that of its own weights (speculative decoding stays lossless against the MXFP4 target)."""

from __future__ import annotations

import copy

import httpx
import torch

from tests.server.conftest import EOS, run_server
from ultraspeed.engine.generate import generate_plain
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.quant.apply import quantize_experts


def greedy(model, prompt, max_tokens):
    return sum(generate_plain(model, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), (EOS,)), [])


def test_ultraspeed_tier_decodes_with_mxfp4_experts_in_its_own_engine(tiny):
    fast = quantize_experts(copy.deepcopy(tiny.model), "ceil")
    prompt = [ord(c) for c in "the quick brown fox jumps over"]
    with torch.inference_mode():    # the quantized model really is another model
        ids = torch.tensor([prompt])
        a, _ = tiny.model(ids, tiny.model.new_cache(1, 64))
        b, _ = fast(ids, fast.new_cache(1, 64))
        assert not torch.allclose(tiny.model.logits(a), fast.logits(b), atol=1e-4)
    with run_server(tiny.model, tiny.tokenizer, tiny.drafter, ultraspeed_model=fast) as running:
        engines = running.state.engines
        # (The tiny random model's greedy tokens barely depend on its MLP, so which weights each tier decodes
        # with is checked on the engines; the texts below check that each decodes exactly with its own.)
        assert engines["standard"].model is tiny.model and engines["ultraspeed"].model is fast
        assert not engines["standard"].speculative and engines["ultraspeed"].speculative
        with httpx.Client(base_url=running.url, timeout=60) as http:
            cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
            assert cards["tiny"]["experts"] == "original" and cards["tiny-ultraspeed"]["experts"] == "mxfp4"
            body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
            out = {m: http.post("/v1/completions", json={**body, "model": m}).json() for m in cards}
            assert http.get("/health").json()["status"] == "ok"
            metrics = http.get("/metrics").text
    assert out["tiny"]["tier"] == "standard" and out["tiny-ultraspeed"]["tier"] == "ultraspeed"
    assert out["tiny"]["choices"][0]["text"] == tiny.tokenizer.decode(greedy(tiny.model, prompt, 16))
    assert out["tiny-ultraspeed"]["choices"][0]["text"] == tiny.tokenizer.decode(greedy(fast, prompt, 16))
    assert out["tiny-ultraspeed"]["ultraspeed"]["speculative"]
    for tier in ("standard", "ultraspeed"):
        assert f'ultraspeed_requests_total{{tier="{tier}",outcome="ok"}} 1' in metrics
