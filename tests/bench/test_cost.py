import json

import pytest

from ultraspeed.bench.cost import Task, Tier, compare, speeds_from_bench, tier_economics
from ultraspeed.cli import main
from ultraspeed.errors import UltraSpeedError


def test_single_tier_formula():
    r = tier_economics(Tier("s", tokens_per_s=100, price_multiplier=3, ttft_s=1.0, timeout_retry_rate=0.2),
                       Task(output_tokens=1000, prompt_tokens=500, price_in_per_m=1.0, price_out_per_m=4.0,
                            value_of_time_per_h=36.0))
    assert r["attempts_per_success"] == pytest.approx(1.25)
    assert r["seconds_per_task"] == pytest.approx(1.25 * 11.0)
    assert r["money_per_task"] == pytest.approx(1.25 * 3 * (500 * 1 + 1000 * 4) / 1e6)
    assert r["effective_cost_per_task"] == pytest.approx(r["money_per_task"] + 0.01 * 13.75)


def test_break_even_makes_tiers_equal():
    tiers = [Tier("standard", 50), Tier("ultraspeed", 500, price_multiplier=3)]
    v = compare(tiers, Task(2000))["break_even_value_of_time_per_h"]
    at = compare(tiers, Task(2000, value_of_time_per_h=v))
    costs = [t["effective_cost_per_task"] for t in at["tiers"]]
    assert costs[0] == pytest.approx(costs[1])
    assert compare(tiers, Task(2000, value_of_time_per_h=v * 2))["cheaper_at_given_value_of_time"] == "ultraspeed"
    assert compare(tiers, Task(2000, value_of_time_per_h=v / 2))["cheaper_at_given_value_of_time"] == "standard"


def test_retries_make_slow_tier_worse():
    task = Task(4000, value_of_time_per_h=10)
    calm = tier_economics(Tier("s", 20), task)
    flaky = tier_economics(Tier("s", 20, timeout_retry_rate=0.5), task)
    assert flaky["effective_cost_per_task"] == pytest.approx(2 * calm["effective_cost_per_task"])


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(UltraSpeedError):
        Tier("x", 0)
    with pytest.raises(UltraSpeedError):
        Tier("x", 10, timeout_retry_rate=1.0)
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    with pytest.raises(UltraSpeedError):
        speeds_from_bench(bad)


def test_cli_reads_speeds_from_bench_report(tmp_path, capsys):
    report = {"bench": "speed", "systems": {"ultraspeed_plain": {"tokens_per_s": 40.0},
                                            "ultraspeed_dflash": {"tokens_per_s": 120.0}}}
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(report))
    assert main(["cost", "--from-bench", str(path), "--json", "--value-of-time", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [t["tier"] for t in out["tiers"]] == ["standard", "ultraspeed"]
    assert out["tiers"][1]["seconds_per_task"] < out["tiers"][0]["seconds_per_task"]
    assert main(["cost"]) == 2


def test_an_acceptance_report_gives_the_speed_as_served(tmp_path):
    """`served` is what generate and serve run; the bare drafter's whole-block speed can be slower than plain."""
    def domain(plain, bare, served):
        return {"plain_tokens_per_s": plain, "blocks": {"8": {"tokens_per_s": bare, "served": {"tokens_per_s": served}},
                                                        "16": {"tokens_per_s": bare, "served": {"tokens_per_s": 1.0}}}}
    path = tmp_path / "acceptance.json"
    path.write_text(json.dumps({"bench": "acceptance", "results": {"code": domain(40, 30, 60), "math": domain(50, 35, 80)}}))
    assert speeds_from_bench(path) == {"standard": 45.0, "ultraspeed": 70.0}


@pytest.mark.parametrize("content", ['[1, 2]', '{"bench": "speed"}', '{"bench": "speed", "systems": []}',
                                     '{"bench": "acceptance", "results": {}}', '{"bench": "other"}',
                                     '{"bench": "speed", "systems": {"ultraspeed_plain": {"tokens_per_s": "fast"}}}',
                                     '{"bench": "speed", "systems": {"ultraspeed_plain": {"tokens_per_s": -3}}}'])
def test_a_malformed_report_is_one_clear_error(tmp_path, content):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(UltraSpeedError, match="r.json"):
        speeds_from_bench(path)
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(UltraSpeedError, match="r.json"):
        speeds_from_bench(path)


def test_flags_fill_what_a_report_lacks_and_impossible_numbers_are_refused(tmp_path, capsys):
    path = tmp_path / "speed.json"
    path.write_text(json.dumps({"bench": "speed", "systems": {"ultraspeed_plain": {"tokens_per_s": 40.0}}}))
    assert main(["cost", "--from-bench", str(path)]) == 2
    assert "has no ultraspeed speed" in capsys.readouterr().err
    assert main(["cost", "--from-bench", str(path), "--ultraspeed-speed", "90", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tiers"][1]["seconds_per_task"] > 0
    for flags in (["--standard-speed", "nan"], ["--ttft", "-1"], ["--output-tokens", "-100"], ["--multiplier", "-3"],
                  ["--value-of-time", "-50"], ["--standard-speed", "0"]):
        assert main(["cost", "--standard-speed", "40", "--ultraspeed-speed", "90", *flags]) == 2, flags
    with pytest.raises(UltraSpeedError):
        Task(100, price_out_per_m=-2.0)
