"""`bench report`: a real quick run of our plain and MXFP4 systems on one domain, and the pure pieces (summaries,
ratios, Markdown, charts) on made-up numbers."""

import json
from pathlib import Path

import pytest

from ultraspeed.bench import plots
from ultraspeed.bench.report import (ALL, GPU_NOTE, Sample, add_block_speedups, chart_data, format_markdown,
                                     missing_reason, ratios, summarize, summarize_domains)
from ultraspeed.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"


def table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("| ")]


def test_quick_report_end_to_end(capsys, tmp_path):
    systems = ["ours_plain", "ours_mxfp4"]
    assert main(["bench", "report", "--quick", "--systems", *systems, "--domains", "math", "--threads", "1",
                 "--out-dir", str(tmp_path), "--json"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report == json.loads(capsys.readouterr().out)

    assert report["bench"] == "report" and report["greedy"] is True
    assert (report["config"]["repeats"], report["config"]["prompts_per_domain"], report["config"]["new_tokens"]) == \
        (1, 1, 16)
    assert report["prompts"]["math"]["count"] == 1 and report["machine"]["cores"] >= 1
    assert list(report["systems"]) == systems
    for name in systems:
        s = report["systems"][name]
        assert s["weights"] in ("q4+int8", "int8", "checkpoint")
        for scope in (s["domains"]["math"], s[ALL]):
            assert scope["samples"] == 1
            for metric in ("tokens_per_s", "ttft_s"):
                x = scope[metric]
                assert 0 < x["min"] <= x["median"] <= x["max"]
            assert scope["mean_accepted"] == 1.0            # plain decoding commits one token per forward
        mem = s["memory_mb"]
        assert mem["peak_rss"] > 0 and 0 < mem["extra_peak"] <= mem["peak_rss"]
    assert report["systems"]["ours_mxfp4"]["mxfp4"]["rounding"] == "gptq"            # as the tier serves it
    assert report["systems"]["ours_mxfp4"]["mxfp4"]["scale_rule"] == "mse"
    r = report["ratios"]["ours_mxfp4"]["ours_plain"]
    rates = [report["systems"][n][ALL]["tokens_per_s"]["median"] for n in ("ours_mxfp4", "ours_plain")]
    assert r[ALL] == pytest.approx(rates[0] / rates[1], rel=1e-2) and set(r) == {"math", ALL}

    markdown = (tmp_path / "report.md").read_text()
    assert markdown == format_markdown(report)
    first_cells = [row[0] for row in table_rows(markdown)]
    assert all(name in first_cells for name in systems)
    if report["machine"]["device"] == "cpu":
        assert GPU_NOTE in markdown
    assert report["charts"] == {"tokens_per_s": "tokens_per_s.png"}     # no DFlash: no block charts
    # DFlash systems would run as generate serves them: lookup drafts where the context repeats
    assert report["config"]["lookup"] is True and "lookup drafts, as generate and serve run" in markdown
    assert is_png(tmp_path / "tokens_per_s.png") and "](tokens_per_s.png)" in markdown


def test_an_interrupted_report_resumes_with_the_systems_it_had_not_measured(tmp_path, monkeypatch):
    from ultraspeed.bench import report as report_module
    calls, interrupt = [], [True]

    def fake_measure(job):
        calls.append(job.name)
        if job.name == "ours_mxfp4" and interrupt:
            interrupt.clear()
            raise KeyboardInterrupt         # the user stops the first run during its second system
        return {**summarize_domains({"math": samples(10.0 + len(calls), (1,))}), "weights": "int8",
                "memory_mb": {"peak_rss": 1.0, "baseline_rss": 0.5, "extra_peak": 0.5, "end_rss": 1.0}}
    monkeypatch.setattr(report_module, "run_in_fresh_process", fake_measure)
    systems = ["ours_plain", "ours_mxfp4", "hf_transformers"]
    args = ["bench", "report", "--quick", "--systems", *systems, "--domains", "math", "--threads", "1",
            "--out-dir", str(tmp_path)]
    assert main(args) == 130                                   # Ctrl-C
    assert (tmp_path / ".partial" / "ours_plain.json").exists() and not (tmp_path / "report.json").exists()
    calls.clear()
    assert main(args) == 0
    assert calls == ["ours_mxfp4", "hf_transformers"]          # ours_plain came from the first run
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["resumed_systems"] == ["ours_plain"] and list(report["systems"]) == systems
    assert report["systems"]["ours_plain"][ALL]["tokens_per_s"]["median"] == 11.0
    assert not (tmp_path / ".partial").exists()
    calls.clear()                                              # a finished report is not reused
    assert main(args) == 0 and calls == systems


def samples(rate: float, accepted: tuple[int, ...] = ()) -> list[Sample]:
    """Three samples whose tok/s are rate/2, rate, 2*rate (median: rate)."""
    return [Sample(16, 16 / (rate * f), 0.1 * f, accepted) for f in (0.5, 1.0, 2.0)]


def fake_report() -> dict:
    plain = summarize_domains({"code": samples(10.0, (1,) * 15), "math": samples(20.0, (1,) * 15)})
    dflash = {"block_size": 8, "blocks": {
        "4": summarize_domains({"code": samples(20.0, (4, 2)), "math": samples(30.0, (3, 3))}),
        "8": summarize_domains({"code": samples(30.0, (8, 1, 3)), "math": samples(50.0, (6, 8))})}}
    dflash.update(dflash["blocks"]["8"])
    mem = {"memory_mb": {"peak_rss": 900.0, "baseline_rss": 200.0, "extra_peak": 700.0, "end_rss": 800.0}}
    systems = {"ours_plain": {**plain, **mem}, "ours_dflash": {**dflash, **mem},
               "hf_transformers": {**summarize_domains({"code": samples(5.0), "math": samples(5.0)}), **mem},
               "llama_cpp": {"missing": "not installed (llama_cpp)"}, "ours_mxfp4": {"failed": "RuntimeError: boom"}}
    add_block_speedups(systems, ("code", "math"))
    return {"machine": {"cpu": "cpu", "cores": 2, "torch_threads": 1, "device": "cpu", "torch": "t",
                        "python": "p", "date": "d"},
            "config": {"new_tokens": 16, "repeats": 3}, "model": "m", "drafter": "d.safetensors",
            "prompts": {"code": {"count": 1, "source": "s", "mean_tokens": 40.0},
                        "math": {"count": 1, "source": "s", "mean_tokens": 50.0}},
            "systems": systems, "ratios": ratios(systems, ("code", "math")), "charts": {}}


def test_summaries_ratios_and_speedups():
    s = summarize(samples(10.0, (2, 4)))
    assert s["tokens_per_s"] == {"median": 10.0, "min": 5.0, "max": 20.0}
    assert s["ttft_s"]["median"] == 0.1 and s["mean_accepted"] == 3.0
    assert s["accepted_histogram"] == {"1": 0, "2": 3, "3": 0, "4": 3}
    report = fake_report()
    assert report["ratios"]["ours_dflash"]["hf_transformers"] == {"code": 6.0, "math": 10.0, ALL: pytest.approx(
        report["systems"]["ours_dflash"][ALL]["tokens_per_s"]["median"] / 5.0, rel=1e-3)}
    assert set(report["ratios"]) == {"ours_plain", "ours_dflash"}     # missing and failed systems have no ratios
    assert "ours_plain" not in report["ratios"]["ours_plain"]
    speedups = report["systems"]["ours_dflash"]["blocks"]["4"]["speedup_vs_plain"]
    assert speedups["code"] == 2.0 and speedups["math"] == 1.5


def test_markdown_lists_missing_and_failed_systems():
    markdown = format_markdown(fake_report())
    rows = {row[0]: row for row in table_rows(markdown)}
    assert rows["llama_cpp"][1] == "missing: not installed (llama_cpp)"
    assert rows["ours_mxfp4"][1] == "failed: RuntimeError: boom"
    assert GPU_NOTE in markdown and "8 (as served)" in markdown


def test_missing_reasons(tmp_path):
    assert "drafter" in missing_reason("ours_dflash", tmp_path / "m.gguf", None)
    assert "not found" in missing_reason("ours_mxfp4_dflash", tmp_path / "m.gguf", tmp_path / "nope.safetensors")
    assert missing_reason("ours_plain", tmp_path, None) is None
    assert missing_reason("hf_transformers", tmp_path / "model_dir", None)      # peers need a GGUF file


def test_every_chart_is_a_png(tmp_path):
    data = chart_data(fake_report())
    assert all(data.values())
    assert data["accepted_histogram"]["ours_dflash code (block 8)"] == {1: 3, 2: 0, 3: 3, 4: 0, 5: 0, 6: 0, 7: 0,
                                                                        8: 3}
    draw = {"tokens_per_s": plots.tokens_per_s_chart, "accepted_by_block": plots.accepted_by_block_chart,
            "speedup_by_block": plots.speedup_by_block_chart, "accepted_histogram": plots.accepted_histogram_chart}
    for chart, values in data.items():
        assert is_png(draw[chart](values, tmp_path / "charts" / f"{chart}.png"))
