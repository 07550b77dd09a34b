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


def random_drafter_file(directory, block_size: int):
    """A 1-layer random drafter for the default model, saved: the benchmarks run it, nobody judges its drafts."""
    loaded = load_model("default")
    drafter = DFlashDrafter(DFlashConfig.for_target(loaded.config, num_layers=1, num_features=2,
                                                    block_size=block_size))
    init_random(drafter)
    path = directory / "d.safetensors"
    save_drafter(drafter, path)
    return path


def test_bench_acceptance_json(capsys, tmp_path):
    path = random_drafter_file(tmp_path, block_size=8)
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
        # Adaptive verification: measured beside whole blocks, never verifying more drafts than the block has.
        a = r["adaptive"]
        assert 0 <= a["mean_drafts_verified"] <= int(block) - 1 and a["tokens_per_s"] > 0
        assert r["mean_drafts_verified"] == int(block) - 1
        # As generate serves: lookup drafts where the context repeats; the whole-block runs never use them.
        assert r["lookup_step_share"] == 0 and 0 <= r["served"]["lookup_step_share"] <= 1
        assert r["gave_up"] == 0 and r["served"]["gave_up"] in (0, 1)     # only the served mode gives up
        # The served runs draft from the shipped corpus too; the same runs without it are timed beside them.
        assert r["lookup"]["gave_up"] in (0, 1) and 0 <= r["lookup"]["lookup_step_share"] <= 1
        # After the first token: decode speed beside whole-reply speed, its speed-up against plain's decode speed.
        for mode in (r, a, r["served"]):
            assert mode["median_ttft_s"] > 0 and mode["decode_tokens_per_s"] > 0
            assert mode["decode_speedup_vs_plain"] == pytest.approx(
                mode["decode_tokens_per_s"] / report["results"]["math"]["plain_decode_tokens_per_s"], rel=0.02)
    assert report["results"]["math"]["plain_median_ttft_s"] > 0
    assert set(report["step_costs"]) == {"4", "8"}
    assert report["lookup_corpus"]["sequences"] > 100


def test_decode_rate_leaves_out_the_first_token_and_the_prefill():
    from ultraspeed.bench.acceptance import decode_rate
    from ultraspeed.engine.generate import GenerationStats
    replies = [GenerationStats(new_tokens=5, prefill_seconds=9.0, decode_seconds=2.0),
               GenerationStats(new_tokens=1, prefill_seconds=1.0, decode_seconds=0.0)]
    assert decode_rate(replies) == pytest.approx(2.0)       # 4 tokens after the first, in 2 s
    assert decode_rate([GenerationStats(new_tokens=1)]) == 0.0


def test_bench_acceptance_verify_full_and_no_lookup_skip_their_runs(capsys, tmp_path):
    path = random_drafter_file(tmp_path, block_size=4)
    assert main(["bench", "acceptance", "--drafter", str(path), "--domains", "math", "--block-sizes", "4",
                 "--prompts", "1", "--max-tokens", "3", "--threads", "1", "--verify", "full", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "adaptive" not in report["results"]["math"]["blocks"]["4"] and report["step_costs"] == {}
    assert main(["bench", "acceptance", "--drafter", str(path), "--domains", "math", "--block-sizes", "4",
                 "--prompts", "1", "--max-tokens", "3", "--threads", "1", "--no-lookup", "--json"]) == 0
    blocks = json.loads(capsys.readouterr().out)["results"]["math"]["blocks"]["4"]
    assert "adaptive" in blocks and "served" not in blocks and "lookup" not in blocks
    assert main(["bench", "acceptance", "--drafter", str(path), "--domains", "math", "--block-sizes", "4",
                 "--prompts", "1", "--max-tokens", "3", "--threads", "1", "--lookup-corpus", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "served" in report["results"]["math"]["blocks"]["4"] and "lookup" not in report["results"]["math"]["blocks"]["4"]
    assert report["lookup_corpus"] is None


def test_bench_acceptance_split_train_measures_the_training_prompts(capsys, tmp_path, monkeypatch):
    import ultraspeed.bench.acceptance as acceptance
    from ultraspeed.train.prompts import domain_prompts
    asked = []

    def recording(domain, split, count):
        asked.append((domain, split))
        return domain_prompts(domain, split, count)

    monkeypatch.setattr(acceptance, "domain_prompts", recording)
    path = random_drafter_file(tmp_path, block_size=4)
    assert main(["bench", "acceptance", "--drafter", str(path), "--domains", "math", "--block-sizes", "4",
                 "--prompts", "1", "--max-tokens", "3", "--threads", "1", "--split", "train", "--weights", "fp32",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert asked == [("math", "train")]
    assert report["split"] == "train" and report["weights"] == "checkpoint"
    assert domain_prompts("math", "train", 1) != domain_prompts("math", "eval", 1)


def test_acceptance_config_rejects_an_unknown_split():
    from ultraspeed.bench.acceptance import AcceptanceConfig
    with pytest.raises(ValueError, match="split"):
        AcceptanceConfig(split="test")


def test_bench_acceptance_runs_every_configuration_on_a_prompt_back_to_back(capsys, tmp_path, monkeypatch):
    """Speed-ups are ratios: each prompt runs plain and every block/verify mode in a row, in a rotating order,
    so a slow spell of the machine cannot fall on one configuration only."""
    import ultraspeed.bench.acceptance as acceptance
    order = []
    real_plain, real_spec = acceptance.generate_plain, acceptance.generate_speculative

    def plain(model, prompt, *args, **kw):
        order.append((len(prompt), "plain"))
        return real_plain(model, prompt, *args, **kw)

    def speculative(model, drafter, prompt, *args, step_cost=None, lookup=False, corpus=None, **kw):
        mode = ("served" if corpus is not None else "lookup") if lookup else (
            "adaptive" if step_cost is not None else "full")
        order.append((len(prompt), mode))
        return real_spec(model, drafter, prompt, *args, step_cost=step_cost, lookup=lookup, corpus=corpus, **kw)

    monkeypatch.setattr(acceptance, "generate_plain", plain)
    monkeypatch.setattr(acceptance, "generate_speculative", speculative)
    path = random_drafter_file(tmp_path, block_size=4)
    assert main(["bench", "acceptance", "--drafter", str(path), "--domains", "math", "--block-sizes", "4",
                 "--prompts", "2", "--max-tokens", "3", "--threads", "1", "--json"]) == 0
    first, second = order[0][0], order[5][0]
    assert first != second
    modes = ["plain", "full", "adaptive", "lookup", "served"]       # served: lookup drafts + the shipped corpus
    assert order == [(first, m) for m in modes] + [(second, m) for m in modes[1:] + modes[:1]]
    assert json.loads(capsys.readouterr().out)["results"]["math"]["prompts"] == 2
