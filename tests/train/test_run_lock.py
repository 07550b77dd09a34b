"""One training run per output directory: a second one is refused at once, and a lock never outlives its run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ultraspeed.cli import main
from ultraspeed.errors import UltraSpeedError
from ultraspeed.train.run_lock import exclusive_run

HOLD = ("import sys, time; from pathlib import Path; from ultraspeed.train.run_lock import exclusive_run\n"
        "with exclusive_run(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)")


def test_a_second_run_on_the_same_out_is_refused_until_the_first_ends(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UltraSpeedError, match="in use by another run"):
            with exclusive_run(tmp_path):
                pass
        for command in (["train-drafter", "--out", str(tmp_path)], ["qat", "--out", str(tmp_path)]):
            assert main(command) == 2
            assert "in use by another run" in capsys.readouterr().err
    finally:
        holder.kill()                      # killed, not released: the OS drops the lock with the process
        holder.wait()
    with exclusive_run(tmp_path):
        pass
