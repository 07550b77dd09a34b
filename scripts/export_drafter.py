"""Export a trained drafter for shipping: fp16 weights (half the size), config and training metadata kept.

usage: python scripts/export_drafter.py runs/drafter/drafter.safetensors ultraspeed/drafters/NAME.safetensors
"""

import sys

import torch
from safetensors import safe_open

from ultraspeed.models.dflash import load_drafter, save_drafter


def main(src: str, dst: str) -> None:
    with safe_open(src, framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "dflash_config"}
    drafter = load_drafter(src)
    drafter.half()
    drafter.draft_vocab = drafter.draft_vocab.long() if drafter.draft_vocab is not None else None
    save_drafter(drafter, dst, meta)
    print(f"{dst}: {sum(p.numel() for p in drafter.parameters()) / 1e6:.2f}M parameters (fp16)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
