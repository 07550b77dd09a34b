"""`ultraspeed serve` as a user runs it: a model directory with its tokenizer, a drafter file and an API keys
file; the server answers, and SIGTERM shuts it down gracefully."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.conftest import CHAT_TEMPLATE, free_socket
from ultraspeed.models.dflash import save_drafter


def test_serve_subcommand_end_to_end(tiny, tmp_path):
    model_dir = tmp_path / "tiny-chat"
    shutil.copytree(tiny.checkpoint, model_dir)
    tiny.tokenizer.backend.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|eos|>", "bos_token": "<|bos|>"}))
    save_drafter(tiny.drafter, tmp_path / "drafter.safetensors")
    (tmp_path / "keys.txt").write_text("# trial\nsecret-key\n")
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ultraspeed", "serve", "--model", str(model_dir), "--drafter",
         str(tmp_path / "drafter.safetensors"), "--port", str(port), "--api-keys-file", str(tmp_path / "keys.txt"),
         "--threads", "1", "--ultraspeed-max-concurrent", "1", "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, ULTRASPEED_CACHE=str(tmp_path / "cache")))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer secret-key"}
        models = httpx.get(url + "/v1/models", headers=headers).json()["data"]
        assert [m["id"] for m in models] == ["tiny-chat", "tiny-chat-ultraspeed"]
        assert models[1]["speculative"] and models[1]["max_concurrent_requests"] == 1
        assert models[0]["experts"] == "original" and models[1]["experts"] == "mxfp4"
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=30, json={
            "model": "tiny-chat-ultraspeed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert r.status_code == 200 and r.json()["tier"] == "ultraspeed" and r.json()["cost"] > 0
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the server did not stop on SIGTERM")
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says "terminated by SIGTERM".
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output, output
    assert "serving tiny-chat and tiny-chat-ultraspeed (MXFP4 experts, DFlash speculative)" in output
    assert "MXFP4 at start-up by GPTQ" in output and "--ultraspeed-model DIR" in output    # the quality hint
    assert len(list((tmp_path / "cache" / "gptq").glob("*.safetensors"))) == 1      # the next start loads it
