"""One run per output directory: `train-drafter` and `qat` resume from what is in their --out, so two runs sharing
one would interleave their checkpoints (one resuming from the other's) and both report success."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ultraspeed.errors import UltraSpeedError


@contextmanager
def exclusive_run(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on out_dir/.lock for the block; UltraSpeedError at once if another run holds it. The
    operating system releases the lock when the process ends, however it ends, so a killed run never leaves it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UltraSpeedError(f"{out_dir} is in use by another run (it holds {out_dir / '.lock'}); wait for it "
                                  "or choose another --out") from None
        yield
    finally:
        os.close(fd)                  # closing releases the lock
