"""GPTQ rounding to MXFP4 (ultraspeed/quant/gptq.py): with uncorrelated inputs it is round-to-nearest exactly;
with correlated ones it reconstructs the layer's output better; its values lie on their groups' MXFP4 grid, so
packing keeps them exactly; on a tiny model it rounds every dense MLP projection, and the serving copy is cached
and reloaded bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.quant.tiny import token_ids
from ultraspeed.loader import load_model
from ultraspeed.quant import gptq
from ultraspeed.quant.apply import MXFP4Linear, quantize_experts
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
    assert gptq.gptq_mlp(model, windows) == 2 * model.config.num_layers
    rounded = {name: linear.weight.detach().clone() for name, linear in gptq.mlp_linears(model).items()}
    quantize_experts(model, "mse")
    for name, weight in rounded.items():
        packed = model.get_submodule(name)
        assert isinstance(packed, MXFP4Linear)
        assert torch.equal(dequantize_mxfp4(packed.weight_blocks, packed.weight_scales), weight)
    moe = load_model(tiny_dir("qwen3_moe")).model
    assert gptq.gptq_mlp(moe, windows) == 0           # routed experts are left to round-to-nearest


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
    monkeypatch.setattr(gptq, "gptq_mlp", no_calibration)
    again = gptq.gptq_mxfp4_copy(loaded, "mse", tmp_path)
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids = token_ids(seed=6, batch=1, length=10)
    with torch.no_grad():
        assert torch.equal(first(ids, first.new_cache(1, 10))[0], again(ids, again.new_cache(1, 10))[0])

    entries[0].write_bytes(b"not a safetensors file")                          # damaged: calibrate again
    monkeypatch.undo()
    monkeypatch.setattr(gptq, "calibration_windows", lambda tokenizer, **_: windows)
    rebuilt = gptq.gptq_mxfp4_copy(loaded, "mse", tmp_path)
    for (name, a), (_, b) in zip(first.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name
