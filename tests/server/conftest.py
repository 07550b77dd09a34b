"""Fixtures for the server tests: a tiny random qwen2 target, a random DFlash drafter, a one-token-per-character
tokenizer, and uvicorn servers on 127.0.0.1 (a pre-bound random port, no race) running in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.tokenizer import Tokenizer

pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

VOCAB = 130               # 128 ASCII bytes + <|eos|> + <|bos|>
EOS, BOS = 128, 129
CHAT_TEMPLATE = ("{% for m in messages %}<|bos|>{{ m.role }}\n{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for every byte (what a byte-level BPE vocabulary is written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges over ASCII: one token per character, so any id < 128 decodes cleanly."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    chars = _byte_chars()
    backend = HFTokenizer(models.BPE(vocab={chars[b]: b for b in range(128)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|eos|>", special=True, normalized=False),
                                AddedToken("<|bos|>", special=True, normalized=False)])
    assert backend.token_to_id("<|eos|>") == EOS
    return Tokenizer(backend, CHAT_TEMPLATE, "<|bos|>", "<|eos|>", False, (EOS,))


@dataclass
class Tiny:
    model: object
    drafter: object
    tokenizer: Tokenizer
    checkpoint: object      # the HF directory the target was saved to


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    model = ours_from_hf(hf_model("qwen2", seed=3, vocab_size=VOCAB, eos_token_id=EOS, bos_token_id=BOS),
                         directory)
    drafter = DFlashDrafter(DFlashConfig.for_target(model.config, num_layers=1, num_features=2, block_size=4))
    init_random(drafter, 0)
    return Tiny(model, drafter.requires_grad_(False), tiny_tokenizer(), directory)


class ScriptedModel(torch.nn.Module):
    """A bigram test double with the Decoder's serving interface: the next token depends only on the last one,
    with the probabilities of `table` ({prev_char: {next_char_or_EOS: p}}; unlisted -> EOS). It makes sampled
    candidates predictable enough to verify ("v=" then a random digit) and, with `delay_s`, makes decoding slow
    enough to hold requests in flight deterministically."""

    def __init__(self, table: dict[str, dict], delay_s: float = 0.0, max_position: int = 256) -> None:
        super().__init__()
        logp = torch.full((VOCAB, VOCAB), -30.0)
        logp[:, EOS] = 0.0
        for prev, nexts in table.items():
            logp[ord(prev)] = -30.0
            for tok, p in nexts.items():
                logp[ord(prev), EOS if tok is EOS else ord(tok)] = float(torch.tensor(p).log())
        self.embed_tokens = torch.nn.Embedding(VOCAB, VOCAB, _weight=logp)
        self.config = type("Config", (), {"max_position": max_position, "vocab_size": VOCAB})()
        self.delay_s = delay_s
        self.fail = False       # set to make the next forward raise (then it works again)

    def new_cache(self, max_batch: int = 1, max_len: int | None = None):
        from ultraspeed.engine.kv_cache import KVCache
        return KVCache.allocate([(1, 1, 1)], max_batch, min(max_len or 256, self.config.max_position))

    def forward(self, ids, cache, capture_layers=(), first_row: int = 0):
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            self.fail = False
            raise RuntimeError("injected fault")
        cache.lengths[first_row:first_row + ids.shape[0]] += ids.shape[1]
        return self.embed_tokens(ids), []

    def logits(self, hidden):
        return hidden


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Running:
    url: str
    app: object
    server: object          # uvicorn.Server
    thread: threading.Thread
    state: object           # the app's ServerState (engine, metrics, ...)

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


@contextlib.contextmanager
def run_server(model, tokenizer: Tokenizer, drafter=None, ultraspeed_model=None, **config):
    """A live server on a random free port, stopped (gracefully) on exit. `config`: ServerConfig fields."""
    import uvicorn
    from ultraspeed.server.app import ServerConfig, build_state, create_app
    config = ServerConfig(**{"model_name": "tiny", "standard_max_running": 4, "ultraspeed_max_running": 2,
                             **config})
    state = build_state(model, tokenizer, drafter, config, ultraspeed_model)
    app = create_app(state)
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    host, port = sock.getsockname()
    running = Running(f"http://{host}:{port}", app, server, thread, state)
    try:
        yield running
    finally:
        running.stop()
        sock.close()


@pytest.fixture(scope="module")
def server(tiny):
    with run_server(tiny.model, tiny.tokenizer, tiny.drafter) as running:
        yield running
