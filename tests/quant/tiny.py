"""Helpers for the quantization tests on tiny random models."""

from __future__ import annotations

from pathlib import Path

import torch

from ultraspeed.models.decoder import Decoder

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def save_tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.BPE(vocab={chr(97 + i): i for i in range(26)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(directory / "tokenizer.json"))


@torch.no_grad()
def logits(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    hidden, _ = model(ids, model.new_cache(ids.shape[0], ids.shape[1]))
    return model.logits(hidden)


def token_ids(seed: int = 0, batch: int = 2, length: int = 12, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (tells -0.0 from +0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]),
                                                                     b.view(INT_VIEW[b.dtype]))
