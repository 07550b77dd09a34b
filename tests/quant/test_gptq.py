"""GPTQ rounding to MXFP4 (ultraspeed/quant/gptq.py): with uncorrelated inputs it is round-to-nearest exactly;
with correlated ones it reconstructs the layer's output better; its values lie on their groups' MXFP4 grid, so
packing keeps them exactly; on tiny models it rounds every dense MLP projection, or every routed expert from the
tokens routed to it (an expert none reached: to nearest), calibrating in memory-bounded groups; the serving copy
is cached and reloaded bit for bit."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.quant.tiny import logits, token_ids
from ultraspeed.loader import load_model
from ultraspeed.quant import gptq
from ultraspeed.quant.apply import MXFP4Experts, MXFP4Linear, quantize_experts
from ultraspeed.quant.mxfp4 import dequantize_mxfp4, fake_quantize_mxfp4, quantize_mxfp4


def correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return torch.randn(n, k, generator=g) @ mix * torch.linspace(0.2, 3.0, k)


def test_uncorrelated_inputs_give_round_to_nearest():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = gptq.gptq_round(w, torch.eye(96, dtype=torch.float64) * 3.0, "mse")
    assert torch.equal(got, fake_quantize_mxfp4(w, "mse"))


@pytest.mark.parametrize("rule", ["mse", "ceil"])
def test_values_lie_on_the_grid_and_reconstruct_the_output_better(rule):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    x = correlated_inputs(2048, 128)
    got = gptq.gptq_round(w, x.T.double() @ x.double() / len(x), rule)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(got, rule)), got)        # packing keeps it exactly
    nearest = fake_quantize_mxfp4(w, rule)
    assert not torch.equal(got, nearest)
    error_gptq = (x @ (w - got).T).square().sum()
    error_nearest = (x @ (w - nearest).T).square().sum()
    assert error_gptq < 0.8 * error_nearest


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        gptq.gptq_round(torch.randn(4, 40), torch.eye(40))
    with pytest.raises(ValueError):
        gptq.gptq_round(torch.randn(4, 64), torch.eye(32))


def test_inputs_that_are_always_zero_do_not_break_the_factorisation():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(512, 64)
    x[:, 5] = 0.0
    got = gptq.gptq_round(w, x.T.double() @ x.double() / len(x))
    assert torch.isfinite(got).all() and got[:, 5].eq(0).all()


def test_a_dense_model_is_rounded_and_packed_exactly(tiny_dir):
    loaded = load_model(tiny_dir("qwen3"))
    model = copy.deepcopy(loaded.model)
    windows = token_ids(seed=4, batch=4, length=32).tolist()
    assert gptq.gptq_experts(model, windows) == 2 * model.config.num_layers
    rounded = {name: linear.weight.detach().clone() for name, linear in gptq.gptq_targets(model).items()}
    quantize_experts(model, "mse")
    for name, weight in rounded.items():
        packed = model.get_submodule(name)
        assert isinstance(packed, MXFP4Linear)
        assert torch.equal(dequantize_mxfp4(packed.weight_blocks, packed.weight_scales), weight)


def test_zero_second_moment_gives_round_to_nearest():
    w = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(7))
    h = torch.stack([torch.zeros(64, 64), torch.eye(64), torch.zeros(64, 64)]).double()
    got = gptq.gptq_round(w, h)
    assert torch.equal(got, fake_quantize_mxfp4(w, "mse"))


def test_memory_groups_are_consecutive_and_within_budget():
    assert gptq.memory_groups([3, 3, 3, 5, 1], 6) == [[0, 1], [2], [3, 4]]
    assert gptq.memory_groups([10, 2], 6) == [[0], [1]]         # an item over the budget gets its own group
    assert gptq.memory_groups([], 6) == []


def test_routed_experts_are_rounded_from_their_own_tokens(tiny_dir, monkeypatch):
    loaded = load_model(tiny_dir("qwen3_moe"))
    windows = token_ids(seed=4, batch=16, length=48).tolist()
    model = copy.deepcopy(loaded.model)
    moes = [m for m in model.modules() if type(m).__name__ == "SparseMoE"]
    for moe in moes:                                          # no token is ever routed to expert 0
        route = moe.route
        monkeypatch.setattr(moe, "route", lambda x, route=route: (route(x)[0], route(x)[1].clamp(min=1)))
    targets = gptq.gptq_targets(model)
    assert list(targets) == [f"layers.{i}.mlp.experts" for i in range(1, model.config.num_layers)]
    original = {k: w.detach().clone() for n, m in targets.items() for k, w in gptq.target_matrices(n, m).items()}
    assert gptq.gptq_experts(model, windows) == len(targets)
    rounded = {k: w.detach().clone() for n, m in targets.items() for k, w in gptq.target_matrices(n, m).items()}
    for key, w in rounded.items():
        nearest = fake_quantize_mxfp4(original[key], "mse")
        assert torch.equal(w[0], nearest[0]), key                   # expert 0: no evidence, round to nearest
        assert not torch.equal(w[1:], nearest[1:]), key
    quantize_experts(model, "mse")
    for name in targets:
        packed = model.get_submodule(name)
        assert isinstance(packed, MXFP4Experts)
        assert torch.equal(dequantize_mxfp4(packed.gate_up_proj_blocks, packed.gate_up_proj_scales),
                           rounded[f"{name}.gate_up_proj"])
        assert torch.equal(dequantize_mxfp4(packed.down_proj_blocks, packed.down_proj_scales),
                           rounded[f"{name}.down_proj"])


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "mimo_v2_flash"])
def test_gptq_experts_reconstruct_the_logits_better_than_nearest(tiny_dir, arch):
    loaded = load_model(tiny_dir(arch))
    held_out = token_ids(seed=9, batch=16, length=64)
    reference = logits(loaded.model, held_out)
    nearest = quantize_experts(copy.deepcopy(loaded.model), "mse")
    model = copy.deepcopy(loaded.model)
    gptq.gptq_experts(model, token_ids(seed=4, batch=16, length=64).tolist())
    quantize_experts(model, "mse")
    error_gptq = (logits(model, held_out) - reference).square().mean()
    error_nearest = (logits(nearest, held_out) - reference).square().mean()
    assert error_gptq < 0.95 * error_nearest


def test_a_small_memory_budget_calibrates_group_by_group(tiny_dir, monkeypatch):
    loaded = load_model(tiny_dir("qwen3_moe"))
    windows = token_ids(seed=4, batch=4, length=32).tolist()
    passes = []
    measure = gptq.input_second_moments
    monkeypatch.setattr(gptq, "input_second_moments",
                        lambda model, w, targets, **k: passes.append(list(targets)) or measure(model, w, targets, **k))
    model = copy.deepcopy(loaded.model)
    one = gptq.moment_bytes(gptq.gptq_targets(model)["layers.1.mlp.experts"])
    assert gptq.gptq_experts(model, windows, memory_budget=one) == 2
    assert passes == [["layers.1.mlp.experts"], ["layers.2.mlp.experts"]]
    passes.clear()
    assert gptq.gptq_experts(copy.deepcopy(loaded.model), windows, memory_budget=2 * one) == 2
    assert passes == [["layers.1.mlp.experts", "layers.2.mlp.experts"]]


def test_the_serving_copy_is_cached(tiny_dir, tmp_path, monkeypatch):
    loaded = load_model(tiny_dir("qwen3"))
    windows = token_ids(seed=5, batch=3, length=32).tolist()
    monkeypatch.setattr(gptq, "calibration_windows", lambda tokenizer, **_: windows)
    first = gptq.gptq_mxfp4_copy(loaded, "mse", tmp_path)
    entries = list(tmp_path.glob("*.safetensors"))
    assert len(entries) == 1
    assert all(type(m) is not MXFP4Linear for m in loaded.model.modules())     # the served model is untouched

    def no_calibration(*_a, **_k):
        raise AssertionError("calibrated again instead of loading the cache")
    monkeypatch.setattr(gptq, "gptq_experts", no_calibration)
    again = gptq.gptq_mxfp4_copy(loaded, "mse", tmp_path)
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids = token_ids(seed=6, batch=1, length=10)
    with torch.no_grad():
        assert torch.equal(first(ids, first.new_cache(1, 10))[0], again(ids, again.new_cache(1, 10))[0])

    fresh = load_model(tiny_dir("qwen3"))
    assert gptq.gptq_mxfp4_copy(fresh, "mse", tmp_path, in_place=True) is fresh.model     # no second copy
    for (name, a), (_, b) in zip(first.state_dict().items(), fresh.model.state_dict().items()):
        assert torch.equal(a, b), name

    entries[0].write_bytes(b"not a safetensors file")                          # damaged: calibrate again
    monkeypatch.undo()
    monkeypatch.setattr(gptq, "calibration_windows", lambda tokenizer, **_: windows)
    rebuilt = gptq.gptq_mxfp4_copy(loaded, "mse", tmp_path)
    for (name, a), (_, b) in zip(first.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name


def test_quantize_cli_writes_the_gptq_rounding(tiny_dir, tmp_path, monkeypatch):
    from ultraspeed.cli import main
    source = tiny_dir("qwen3_moe")
    windows = token_ids(seed=5, batch=8, length=32).tolist()
    monkeypatch.setattr(gptq, "calibration_windows", lambda tokenizer, **_: windows)
    assert main(["quantize", "--rounding", "gptq", str(source), str(tmp_path / "gptq")]) == 0
    expected = load_model(source).model
    gptq.gptq_experts(expected, windows)
    quantize_experts(expected, "mse")
    written = load_model(tmp_path / "gptq")
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["rounding"] == "gptq"
    for name in gptq.gptq_targets(load_model(source).model):
        a, b = written.model.get_submodule(name), expected.get_submodule(name)
        assert torch.equal(a.gate_up_proj_blocks, b.gate_up_proj_blocks), name
        assert torch.equal(a.down_proj_scales, b.down_proj_scales), name
    assert main(["quantize", str(source), str(tmp_path / "nearest")]) == 0
    nearest = load_model(tmp_path / "nearest").model.layers[1].mlp.experts
    assert not torch.equal(nearest.gate_up_proj_blocks, written.model.layers[1].mlp.experts.gate_up_proj_blocks)


def test_replaced_weights_in_a_model_directory_get_a_new_cache_entry(tiny_dir, tmp_path):
    import os
    import shutil
    model_dir = shutil.copytree(tiny_dir("qwen3"), tmp_path / "model")
    loaded = load_model(model_dir)
    before = gptq.cache_entry(loaded, "mse", tmp_path / "cache")
    assert gptq.cache_entry(loaded, "mse", tmp_path / "cache") == before
    weights = model_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))   # new weights
    assert gptq.cache_entry(loaded, "mse", tmp_path / "cache") != before
