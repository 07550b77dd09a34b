"""The benchmarks run end to end on the default model and report what they measured (tiny settings)."""

import json

import pytest

from ultraspeed.cli import main
from ultraspeed.loader import load_model
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random, save_drafter


def test_bench_speed_json(capsys, tmp_path):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--no-peers", "--repeats", "1", "--new-tokens", "4", "--threads", "1",
                 "--json", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    plain = report["systems"]["ultraspeed_plain"]
    assert plain["samples"] == 3 and plain["min"] <= plain["tokens_per_s"] <= plain["max"]
    assert report["machine"]["cores"] >= 1 and "cpu" in report["machine"]


def test_bench_acceptance_json(capsys, tmp_path):
    loaded = load_model("default")
    drafter = DFlashDrafter(DFlashConfig.for_target(loaded.config, num_layers=1, num_features=2, block_size=8))
    init_random(drafter)
    path = tmp_path / "d.safetensors"
    save_drafter(drafter, path)
    assert main(["bench", "acceptance", "--drafter", str(path), "--domains", "math", "--block-sizes", "4", "8",
                 "--prompts", "1", "--max-tokens", "6", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for block in ("4", "8"):
        r = report["results"]["math"]["blocks"][block]
        hist = {int(k): v for k, v in r["accepted_histogram"].items()}
        steps = sum(hist.values())
        assert steps > 0
        assert r["mean_accepted"] == pytest.approx(sum(k * v for k, v in hist.items()) / steps, abs=1e-3)
        assert r["speedup_vs_plain"] > 0
