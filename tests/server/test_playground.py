"""The playground in a real browser: headless chromium opens `/`, runs both tiers side by side on one prompt and
shows the streamed text, tokens/s, acceptance and cost. Skipped when chromium is not installed
(`apt-get install chromium`). Chromium is driven through the DevTools protocol over --remote-debugging-pipe
(NUL-terminated JSON on fds 3 and 4), so no websocket or browser-automation package is needed."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from urllib.parse import quote

import pytest

from tests.server.conftest import EOS
from ultraspeed.engine.generate import generate_plain
from ultraspeed.engine.sampler import SamplingParams

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

SUMMARY = """(() => ({
  finished: document.body.dataset.finished || null,
  panes: [...document.querySelectorAll('.pane')].map((p) => ({
    tier: p.dataset.tier, done: p.dataset.done || null, out: p.querySelector('.out').textContent,
    tps: p.querySelector('.tps').textContent, acc: p.querySelector('.acc').textContent,
    foot: p.querySelector('.foot').textContent})),
}))()"""


class DevTools:
    def __init__(self, profile_dir) -> None:
        # High fd numbers, so that bash's `3<&a 4>&b` can never overwrite one with the other.
        cmd_r, cmd_w = os.pipe()
        resp_r, resp_w = os.pipe()
        a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(resp_w, fcntl.F_DUPFD, 10)
        for fd in (cmd_r, resp_w):
            os.close(fd)
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{a} 4>&{b}', CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={profile_dir}",
             "about:blank"], pass_fds=(a, b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(a), os.close(b)
        self.w, self.r, self.buffer, self.next_id = cmd_w, resp_r, b"", 0

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    assert "error" not in reply, reply
                    return reply["result"]
            ready, _, _ = select.select([self.r], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"chromium did not answer {method}"
            chunk = os.read(self.r, 1 << 16)
            assert chunk, "chromium exited"
            self.buffer += chunk

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self.w), os.close(self.r)


def test_playground_compares_both_tiers_live(tiny, server, tmp_path):
    prompt = "Hello there"
    browser = DevTools(tmp_path / "profile")
    try:
        target = browser.call("Target.createTarget", {"url": f"{server.url}/?prompt={quote(prompt)}"
                                                             f"&tier=compare&max_tokens=24&run=1"})
        session = browser.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
        deadline = time.monotonic() + 60
        while True:
            page = browser.call("Runtime.evaluate", {"expression": SUMMARY, "returnByValue": True},
                                session)["result"].get("value") or {}
            if page.get("finished") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        browser.close()

    assert page.get("finished") == "1", page
    panes = {p["tier"]: p for p in page["panes"]}
    assert set(panes) == {"standard", "ultraspeed"}
    ids = tiny.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    want = tiny.tokenizer.decode(sum(generate_plain(tiny.model, ids, SamplingParams(max_tokens=24), (EOS,)), []))
    for tier, p in panes.items():
        assert p["done"] == "1", p
        assert p["out"] == want                  # greedy: both tiers give the same text (lossless speculation)
        assert float(p["tps"]) > 0 and float(p["acc"]) >= 1.0
        assert "cost $" in p["foot"] and tier in p["foot"]
