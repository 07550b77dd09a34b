"""Text <-> token ids, and the chat template, from a Hugging Face directory or from GGUF metadata.

Built on the `tokenizers` library directly (no transformers at run time). A GGUF "gpt2"-style vocabulary becomes
a byte-level BPE; control tokens become special tokens, so they are never split and can be skipped on decode.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, AddedToken

from ultraspeed.config import read_json_object
from ultraspeed.errors import UltraSpeedError

GGUF_CONTROL_TOKEN = 3
GGUF_USER_DEFINED_TOKEN = 4


@dataclass
class Tokenizer:
    backend: HFTokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    _template: jinja2.Template | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """UTF-8 bytes of the longest vocabulary entry, at least the bytes of any text one token stands for:
        text of B bytes is at least B / max_token_bytes tokens, whatever the tokenizer makes of it."""
        return max(len(t.encode()) for t in self.backend.get_vocab(with_added_tokens=True))

    def _encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL where encode holds it (seconds for a megabyte of text): the server
        # tokenizes in a thread while the event loop and the engine thread keep going.
        return self.backend.encode_batch([text], add_special_tokens=False)[0].ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._encode(text)
        bos_id = self.token_id(self.bos_token)
        if add_special_tokens and self.add_bos and bos_id is not None and ids[:1] != [bos_id]:
            ids = [bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own chat template (jinja2, as transformers does)."""
        if self.chat_template is None:
            # No template shipped: plain concatenation is the only honest fallback.
            return "\n".join(m["content"] for m in messages) + "\n"
        if self._template is None:
            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise_template_error
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise UltraSpeedError(f"the model's chat template does not parse ({e}); --raw skips it") from None
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template already places any BOS it wants.
        return self._encode(self.apply_chat_template(messages, add_generation_prompt))


def _raise_template_error(message: str):
    raise UltraSpeedError(f"chat template: {message}")


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def tokenizer_from_hf_dir(directory: Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    path = directory / "tokenizer.json"
    if not path.exists():
        raise UltraSpeedError(f"{directory}: no tokenizer.json (a Hugging Face fast tokenizer is required)")
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:        # the tokenizers library raises a bare Exception
        raise UltraSpeedError(f"{path}: not a tokenizer the tokenizers library can read ({e})") from None
    cfg_path = directory / "tokenizer_config.json"
    cfg = read_json_object(cfg_path) if cfg_path.exists() else {}
    template = cfg.get("chat_template")
    jinja_path = directory / "chat_template.jinja"
    if template is None and jinja_path.exists():
        template = jinja_path.read_text()
    eos = _token_content(cfg.get("eos_token"))
    stops = set(eos_token_ids)
    if eos is not None and backend.token_to_id(eos) is not None:
        stops.add(backend.token_to_id(eos))
    return Tokenizer(backend, template, _token_content(cfg.get("bos_token")), eos,
                     bool(cfg.get("add_bos_token", False)), tuple(sorted(stops)))


def tokenizer_from_gguf(meta: dict) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UltraSpeedError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types)
               if kind in (GGUF_CONTROL_TOKEN, GGUF_USER_DEFINED_TOKEN)]
    backend.add_special_tokens(special)

    def token_at(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    eos = token_at("tokenizer.ggml.eos_token_id")
    stops = {int(meta["tokenizer.ggml.eos_token_id"])} if eos is not None else set()
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        stops.add(int(eot))
    return Tokenizer(backend, meta.get("tokenizer.chat_template"), token_at("tokenizer.ggml.bos_token_id"), eos,
                     bool(meta.get("tokenizer.ggml.add_bos_token", False)), tuple(sorted(stops)))
