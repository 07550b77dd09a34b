"""Tiny random models as complete checkpoint directories (weights, config, tokenizer), built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import hf_model, save_checkpoint
from tests.quant.tiny import save_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """name -> a Hugging Face directory (weights, config, tokenizer) of a tiny random model of TINY_CONFIGS."""
    pytest.importorskip("transformers")
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            directory = save_checkpoint(hf_model(name), tmp_path_factory.mktemp(name))
            save_tiny_tokenizer(directory)
            made[name] = directory
        return made[name]

    return make
