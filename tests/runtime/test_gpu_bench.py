"""scripts/gpu_bench.py cannot run without a GPU; here: it imports, refuses a CPU-only machine with a clear
message, its pure helpers compute the right numbers, and its measuring loop runs end to end on a tiny random MoE
on the CPU (eager only, torch backend, no profiler timeline)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from ultraspeed.models.moe import SparseMoE
from ultraspeed.quant.apply import MXFP4Experts

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_bench.py"


@pytest.fixture(scope="module")
def gb():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module          # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_bench", None)


def test_refuses_to_run_without_cuda(gb, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gb.main(["--output-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_parse_int_list(gb):
    assert gb.parse_int_list("1,8, 16") == [1, 8, 16]
    for bad in ("", "0,2"):
        with pytest.raises(Exception):
            gb.parse_int_list(bad)
    args = gb.build_parser().parse_args(["--batch", "2,4", "--moe-layers", "6"])
    assert args.batch == [2, 4] and args.moe_layers == 6


def test_moe_config_is_qwen3_30b_a3b_shaped(gb):
    c = gb.qwen3_30b_a3b_config()
    assert (c.hidden_size, c.num_layers, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (
        2048, 48, 128, 8, 768)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size, c.qk_norm) == (32, 4, 128, 151936, True)
    assert set(c.mlp_layer_types) == {"sparse"}
    assert gb.qwen3_30b_a3b_config(6).num_layers == 6
    s = gb.smollm2_135m_config()
    assert (s.hidden_size, s.num_layers, s.vocab_size, s.tie_word_embeddings) == (576, 30, 49152, True)


def test_expected_active_experts(gb):
    assert gb.expected_active_experts(128, 8, 1) == pytest.approx(8)
    assert gb.expected_active_experts(128, 8, 2) == pytest.approx(128 * (1 - (120 / 128) ** 2))
    assert gb.expected_active_experts(128, 8, 10_000) == pytest.approx(128)
    assert gb.expected_active_experts(0, 0, 5) == 0


def test_kernel_intervals_and_gap_stats(gb):
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 10.0, "dur": 5.0},
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 0.0, "dur": 4.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 20.0, "dur": 2.0},
        {"ph": "X", "cat": "kernel", "name": "overlap", "ts": 12.0, "dur": 4.0},    # other stream, inside b..16
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 1.0, "dur": 50.0},   # host: ignored
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 3.0},
    ]}
    intervals = gb.kernel_intervals(trace)
    assert [name for _, _, name in intervals] == ["a", "b", "overlap", "Memcpy DtoH"]
    stats = gb.gap_stats(intervals, steps=2)
    # Busy: [0,4] [10,16] [20,22] = 12 us; gaps 6 + 4 = 10 us; span 22 us; per step halves.
    assert stats["busy_us_per_step"] == pytest.approx(6)
    assert stats["gap_us_per_step"] == pytest.approx(5)
    assert stats["span_us_per_step"] == pytest.approx(11)
    assert stats["kernels_per_step"] == pytest.approx(2)
    assert stats["idle_fraction"] == pytest.approx(10 / 22)
    assert stats["median_gap_us"] == pytest.approx(5) and stats["max_gap_us"] == pytest.approx(6)
    assert gb.gap_stats([], 3)["gap_us_per_step"] == 0


def test_bandwidth_helpers(gb):
    assert gb.copy_bandwidth(1 << 30, 0.001) == pytest.approx(2 * (1 << 30) / 0.001)
    assert gb.bandwidth_fraction(1.5e9, 0.001, 3e12) == pytest.approx(0.5)
    assert gb.bandwidth_fraction(1, 0, 1) == 0 and gb.copy_bandwidth(1, 0) == 0
    assert gb.StepBytes(1, 2, 3, 4).total == 10


def test_report_rendering(gb, tmp_path):
    rows = [{"case": "m", "batch": 1, "mode": "plain", "graph": True, "step_ms": 1.25, "tokens_per_step": 1.0,
             "tokens_per_s": 800.0, "bytes_per_step": 2e9, "achieved_gbps": 1600.0, "bw_fraction": 0.5,
             "kernels_per_step": 300, "busy_us_per_step": 1200.0, "gap_us_per_step": 50.0, "idle_fraction": 0.04}]
    meta = {"date": "2030-01-02", "device": "NVIDIA H100", "capability": "9.0", "memory_gib": 80, "cuda": "12.8",
            "torch": "2.x", "triton": "3.x", "backend": "triton", "copy_gbps": 3200.0, "notes": ["a note"],
            "command": "python scripts/gpu_bench.py"}
    text = gb.render_markdown(meta, rows, [{"name": "check", "result": "ok"}])
    assert "2030-01-02" in text and "NVIDIA H100" in text and "3200 GB/s" in text
    assert "| m | 1 | plain | yes | 1.250 | 1.00 | 800 | 300 | 1.200 | 0.050 | 4.0 | 2000.0 | 1600 | 50.0% |" in text
    assert "- check: ok" in text and "- a note" in text
    assert gb.report_path(tmp_path, "2030-01-02") == tmp_path / "gpu_bench_2030-01-02.md"
    table = gb.summary_table(rows)
    assert table.splitlines()[1].split() == ["m", "1", "plain", "yes", "1.250", "0.050", "4.0", "50.0"]


def tiny_moe(gb, layers=6, dtype=torch.float32, mxfp4_experts=True):
    config = gb.qwen3_30b_a3b_config(layers).replace(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, max_position=512)
    return gb.random_decoder(config, "cpu", dtype, mxfp4_experts=mxfp4_experts)


def test_random_models(gb):
    model = tiny_moe(gb)
    experts = model.layers[0].mlp.experts
    assert isinstance(experts, MXFP4Experts) and experts.gate_up_proj_blocks.shape == (8, 64, 2, 16)
    assert experts.gate_up_proj_scales.min() >= 119 and experts.gate_up_proj_scales.max() <= 121
    assert model.embed_tokens.weight.std() == pytest.approx(0.02, rel=0.2)
    assert not any(p.requires_grad for p in model.parameters())
    tied = gb.random_decoder(gb.smollm2_135m_config(num_layers=1).replace(vocab_size=64, max_position=64),
                             "cpu", torch.float32)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    drafter = gb.random_drafter(model, "cpu", torch.float32, block_size=4, num_layers=1)
    assert drafter.config.block_size == 4 and max(drafter.config.target_layer_ids) < 6
    shallow = gb.random_drafter(tiny_moe(gb, layers=2), "cpu", torch.float32, block_size=4, num_layers=1)
    assert all(0 <= i < 2 for i in shallow.config.target_layer_ids)


def test_byte_accounting(gb):
    model = tiny_moe(gb, layers=2)
    per_expert = gb.expert_bytes(model)
    # gate_up [2*32, 64] + down [64, 32] packed: 4.25 bits per weight.
    assert per_expert == (64 * 64 + 64 * 32) * 17 // 32
    dense = gb.dense_weight_bytes(model)
    params = sum(p.numel() * 4 for name, p in model.named_parameters() if "embed_tokens" not in name)
    assert dense == params        # untied: LM head counted, embedding table not, experts not (they are buffers)
    tied = gb.random_decoder(gb.smollm2_135m_config(num_layers=1).replace(vocab_size=64, max_position=64),
                             "cpu", torch.float32)
    assert gb.dense_weight_bytes(tied) == sum(p.numel() * 4 for p in tied.parameters())
    cache = model.new_cache(1, 8)
    assert gb.kv_bytes_per_token(cache) == 2 * (2 * 2 * 16 * 4)


def test_count_active_experts_restores_routing(gb):
    model = tiny_moe(gb, layers=2)

    def run():
        for layer in model.layers:
            layer.mlp.route(torch.randn(3, 64))
    counts = gb.count_active_experts(model, run)
    assert len(counts) == 2 and all(2 <= c <= 6 for c in counts)
    assert all("route" not in vars(layer.mlp) for layer in model.layers if isinstance(layer.mlp, SparseMoE))


def test_measuring_loop_runs_on_cpu(gb):
    model = tiny_moe(gb)
    drafter = gb.random_drafter(model, "cpu", torch.float32, block_size=4, num_layers=1)
    rows = gb.run_case(gb.Case("tiny", model, drafter), [1, 2], context=16, steps=2, profile_steps=1,
                       backend_name="torch", copy_bps=1e10, dynamic_baseline=True, graph_modes=(False,))
    modes = ["plain", "speculative", "plain, sampled", "speculative, sampled", "speculative, lookup only",
             "plain-dynamic"]
    assert [(r["batch"], r["mode"]) for r in rows] == [(b, mode) for b in (1, 2) for mode in modes]
    for r in rows:
        assert r["step_ms"] > 0 and r["bytes_per_step"] > 0 and 0 < r["bw_fraction"]
        assert r["tokens_per_step"] >= 1
    spec = rows[1]
    assert len(spec["active_experts"]) == 6 and spec["bytes"]["expert_weights"] > rows[0]["bytes"]["expert_weights"]
    lookup_only = rows[4]                       # no drafter forward: no drafter weights read
    assert lookup_only["bytes"]["dense_weights"] == rows[0]["bytes"]["dense_weights"] < spec["bytes"]["dense_weights"]
    assert "| tiny | 2 | speculative | no |" in gb.render_markdown({"date": "d", "device": "cpu"}, rows, [])


def test_step_bytes_adds_the_drafter_only_to_speculative_steps(gb):
    fp = gb.Footprint(target_dense=1000, drafter_dense=300, expert=50, kv_target=8, kv_draft=2)
    plain = gb.step_bytes(fp, active_experts=4, batch=2, context=10, new_tokens=1, speculative=False)
    assert plain.__dict__ == {"dense_weights": 1000, "expert_weights": 200, "kv_read": 160, "kv_write": 16}
    spec = gb.step_bytes(fp, active_experts=6, batch=2, context=10, new_tokens=4, speculative=True)
    assert spec.__dict__ == {"dense_weights": 1300, "expert_weights": 300, "kv_read": 200,
                             "kv_write": 2 * 4 * (8 + 4)}


def test_bf16_experts_and_format_flags(gb):
    dense = tiny_moe(gb, layers=2, dtype=torch.bfloat16, mxfp4_experts=False)
    assert not isinstance(dense.layers[0].mlp.experts, MXFP4Experts)
    assert gb.expert_bytes(dense) == (64 * 64 + 64 * 32) * 2        # bf16: 16/4.25 of the MXFP4 expert
    assert gb.parse_formats("mxfp4, bf16") == ["mxfp4", "bf16"]
    for bad in ("", "fp8", "mxfp4,int4"):
        with pytest.raises(Exception):
            gb.parse_formats(bad)
    args = gb.build_parser().parse_args(["--blocks", "1,4", "--expert-formats", "bf16"])
    assert args.blocks == [1, 4] and args.expert_formats == ["bf16"]


def test_block_sweep_runs_on_cpu_and_projects_tokens_per_second(gb):
    model = tiny_moe(gb)
    drafter = gb.random_drafter(model, "cpu", torch.float32, block_size=4, num_layers=1)
    sweep = gb.block_sweep(gb.Case("tiny", model, drafter), 2, [1, 2, 4], context=16, steps=2,
                           backend_name="torch", copy_bps=1e10, graph=False)
    assert [r["block"] for r in sweep] == [1, 2, 4]
    for r in sweep:
        assert r["step_ms"] > 0 and r["bytes_per_step"] > 0 and r["active_experts"] >= 2
    projection = gb.project(sweep, {"measured": {"code": {4: 2.5, 16: 9.0}}, "published": {"math": {2: 1.5}}})
    assert [(p["block"], p["source"], p["domain"]) for p in projection] == [(2, "published", "math"),
                                                                           (4, "measured", "code")]
    code = projection[1]
    assert code["tokens_per_s"] == pytest.approx(2 * 2.5 / (sweep[2]["step_ms"] / 1e3))
    assert code["plain_tokens_per_s"] == pytest.approx(2 / (sweep[0]["step_ms"] / 1e3))
    assert code["speedup"] == pytest.approx(2.5 * sweep[0]["step_ms"] / sweep[2]["step_ms"])
    text = gb.render_markdown({"date": "d", "device": "cpu"}, [], [], sweep, projection)
    assert "## Step time by block size" in text and "| tiny | 2 | no | 4 |" in text
    assert "| tiny | 2 | no | 4 | measured | code | 2.50 |" in text


def test_projection_needs_the_plain_step_of_the_same_case(gb):
    row = {"case": "m", "batch": 1, "graph": True, "step_ms": 2.0}
    assert gb.project([{**row, "block": 8}], {"published": {"code": {8: 6.3}}}) == []
    (p,) = gb.project([{**row, "block": 1, "step_ms": 1.0}, {**row, "block": 8}], {"published": {"code": {8: 6.3}}})
    assert p["tokens_per_s"] == pytest.approx(3150) and p["speedup"] == pytest.approx(3.15)


def test_load_acceptance_reads_a_bench_acceptance_report(gb, tmp_path):
    report = {"bench": "acceptance", "results": {"code": {"blocks": {"8": {"mean_accepted": 1.5},
                                                                     "16": {"mean_accepted": 1.75}}}}}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(report))
    assert gb.load_acceptance(path) == {"code": {8: 1.5, 16: 1.75}}
    path.write_text('{"bench": "speed"}')
    with pytest.raises(ValueError, match="not an `ultraspeed bench acceptance` report"):
        gb.load_acceptance(path)
    assert set(gb.load_acceptance(gb.DEFAULT_ACCEPTANCE)) == {"code", "math", "chat", "agent"}


def test_end_to_end_generation_runs_on_cpu(gb):
    model = gb.random_decoder(gb.smollm2_135m_config(max_position=128, num_layers=2), "cpu", torch.float32)
    drafter = gb.random_drafter(model, "cpu", torch.float32, block_size=4, num_layers=1)
    checks = gb.end_to_end(gb.Case("tiny", model, drafter), prompt_len=8, new_tokens=6, repeats=1, graphs=False)
    assert [c["name"] for c in checks] == ["tiny: ultraspeed generate (static runtime), plain, 6 tokens",
                                           "tiny: ultraspeed generate (static runtime), DFlash, 6 tokens",
                                           "tiny: ultraspeed generate, DFlash output vs plain"]
    assert checks[0]["value"] > 0 and checks[2]["result"] == "identical"      # lossless in fp32
