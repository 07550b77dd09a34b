"""Trained DFlash drafters shipped with the package (small safetensors files, fp16).

smollm2-135m-instruct-dflash.safetensors: for the default model; how it was trained is recorded in
docs/drafter.md and in the file's own metadata (`dflash_config`, `train_step`, `train_tau`).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_DRAFTER = Path(__file__).with_name("smollm2-135m-instruct-dflash.safetensors")


def drafter_for(model: str | None, explicit: str | None) -> Path | None:
    """The drafter to use: an explicit path wins; the default model gets the shipped drafter if present."""
    if explicit:
        return Path(explicit)
    if model in (None, "default") and DEFAULT_DRAFTER.exists():
        return DEFAULT_DRAFTER
    return None
