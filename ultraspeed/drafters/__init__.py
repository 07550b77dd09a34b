"""Trained DFlash drafters shipped with the package (small safetensors files, fp16), and lookup corpora.

smollm2-135m-instruct-dflash.safetensors: for the default model; how it was trained is recorded in
docs/drafter.md and in the file's own metadata (`dflash_config`, `train_step`, `train_tau`).
smollm2-135m-instruct-lookup.npz: the default model's greedy answers to training prompts, with the prompts
(engine/lookup_corpus.py; built by `ultraspeed build-lookup-corpus`, command in docs/drafter.md).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_DRAFTER = Path(__file__).with_name("smollm2-135m-instruct-dflash.safetensors")
DEFAULT_LOOKUP_CORPUS = Path(__file__).with_name("smollm2-135m-instruct-lookup.npz")


def drafter_for(model: str | None, explicit: str | None) -> Path | None:
    """The drafter to use: an explicit path wins; the default model gets the shipped drafter if present."""
    if explicit:
        return Path(explicit)
    if model in (None, "default") and DEFAULT_DRAFTER.exists():
        return DEFAULT_DRAFTER
    return None


def lookup_corpus_for(model: str | None, choice: str) -> Path | None:
    """`--lookup-corpus`: 'none' -> None; 'auto' -> the shipped corpus for the default model (if present); else
    the path given."""
    if choice == "none":
        return None
    if choice == "auto":
        return DEFAULT_LOOKUP_CORPUS if model in (None, "default") and DEFAULT_LOOKUP_CORPUS.exists() else None
    return Path(choice)
