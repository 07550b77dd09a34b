"""Kernel backend choice (ultraspeed/runtime/backend.py). The triton backend is forced on the CPU under
TRITON_INTERPRET=1 (tests/conftest.py sets it) and must match the torch backend on tiny models: dense with QK-norm,
MXFP4 dense MLPs, MXFP4 MoE through the static grouped kernels, sinks + sliding windows (torch fallback), and a
whole speculative step. Sizes are tiny: the interpreter is slow."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.engine.speculative import append_context, features_of, new_draft_cache
from ultraspeed.errors import UltraSpeedError
from ultraspeed.kernels import reference as ref
# Imported here, while TRITON_INTERPRET=1: kernels pick interpreted or compiled mode when first defined, and a test
# below builds a backend under TRITON_INTERPRET=0.
from ultraspeed.kernels import (triton_activation, triton_attention, triton_moe, triton_mxfp4, triton_norm,
                                triton_rope)
from ultraspeed.kernels.triton_compat import HAS_TRITON
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random
from ultraspeed.quant.apply import MXFP4Experts, MXFP4Linear, quantize_experts
from ultraspeed.runtime import backend as be
from ultraspeed.runtime.graphs import load_rows
from ultraspeed.runtime.loop import prefill_rows
from ultraspeed.runtime.static_step import SpeculativeStep, StaticDecoder

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


# ------------------------------------------------------------------------------------------------- choice


def test_cpu_default_is_torch(monkeypatch):
    monkeypatch.delenv("ULTRASPEED_BACKEND", raising=False)
    assert be.choose_backend("cpu").name == "torch"
    assert type(be.choose_backend(torch.device("cpu"))) is be.TorchBackend


@requires_triton
def test_cuda_default_is_triton_unless_interpreted(monkeypatch):
    monkeypatch.delenv("ULTRASPEED_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert be.choose_backend("cuda").name == "triton"      # builds no tensor: no GPU needed to decide
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert be.choose_backend("cuda").name == "torch"


def test_environment_and_argument_override(monkeypatch):
    monkeypatch.setenv("ULTRASPEED_BACKEND", "torch")
    assert be.choose_backend("cuda").name == "torch"
    assert be.choose_backend("cpu", "torch").name == "torch"
    with pytest.raises(UltraSpeedError, match="unknown backend"):
        be.choose_backend("cpu", "cudnn")


@requires_triton
def test_triton_on_cpu_only_interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UltraSpeedError, match="TRITON_INTERPRET"):
        be.choose_backend("cpu", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert be.choose_backend("cpu", "triton").name == "triton"


# ---------------------------------------------------------------------------------------- static moe_align


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 8, 2, 16), (5, 6, 2, 4), (16, 128, 8, 16),
                                                           (40, 4, 2, 16), (3, 64, 8, 1)])
def test_static_moe_align_matches_reference(tokens, experts, top_k, block_m):
    g = torch.Generator().manual_seed(tokens * experts)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    sorted_ids, expert_ids, num_post = be.static_moe_align(ids, experts, block_m)
    want_sorted, want_experts, want_post = ref.moe_align(ids, experts, block_m)
    total = int(want_post)
    assert int(num_post) == total
    assert sorted_ids.shape == (be.padded_slots_bound(tokens * top_k, experts, block_m),)
    assert expert_ids.shape == (sorted_ids.shape[0] // block_m,)
    assert sorted_ids[:total].tolist() == want_sorted.tolist()
    assert expert_ids[:total // block_m].tolist() == want_experts.tolist()
    assert (sorted_ids[total:] == tokens * top_k).all()          # padding is the sentinel


def test_padded_slots_bound_is_tight_in_the_worst_case():
    # Every slot to its own expert: each pads by block_m - 1, the bound exactly.
    ids = torch.arange(12).view(6, 2)
    _, _, num_post = ref.moe_align(ids, 12, 8)
    assert int(num_post) == be.padded_slots_bound(12, 12, 8) == 96


@requires_triton
@interpreted
def test_static_grouped_moe_matches_reference(mxfp4_pair):
    g = torch.Generator().manual_seed(0)
    (w1b, w1s), (w2b, w2s) = mxfp4_pair(4, 64, 32, g)
    x = torch.randn(3, 32, generator=g)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(3)])
    weights = torch.rand(3, 2, generator=g)
    got = be.grouped_moe_mxfp4_static(triton_moe, triton_activation, x, w1b, w1s, w2b, w2s, ids, weights)
    want = ref.grouped_moe_mxfp4(x, w1b, w1s, w2b, w2s, ids, weights)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture
def mxfp4_pair():
    def make(experts, inter2, hidden, g):
        def packed(*shape):
            k = shape[-1]
            blocks = torch.randint(0, 256, (*shape[:-1], k // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(123, 128, (*shape[:-1], k // 32), generator=g, dtype=torch.uint8)
            return blocks, scales
        return packed(experts, inter2, hidden), packed(experts, hidden, inter2 // 2)
    return make


# --------------------------------------------------------------------------------- triton backend vs torch


class Spy:
    """Counts calls of chosen kernel wrappers while delegating to them."""

    def __init__(self, monkeypatch, module, names):
        self.calls = {name: 0 for name in names}
        for name in names:
            original = getattr(module, name)

            def wrapper(*a, _name=name, _orig=original, **kw):
                self.calls[_name] += 1
                return _orig(*a, **kw)
            monkeypatch.setattr(module, name, wrapper)


def forward_both(model, rows=2, prompt=(1, 2, 3, 4), new=((7, 8), (9, 10))):
    """The same static forward (2 rows at different lengths, 2 new tokens each) under both backends."""
    out = {}
    for name in ("torch", "triton"):
        cache = model.new_cache(rows, 24)
        prefill_rows(model, cache, [list(prompt[:3 + r]) for r in range(rows)])
        decoder = StaticDecoder(model, cache, be.choose_backend("cpu", name))
        with torch.no_grad():
            hidden, captured = decoder.forward(torch.tensor(new), cache.lengths[:rows].clone(), (0,))
        out[name] = (model.logits(hidden), captured[0], [k.clone() for k in cache.keys])
    return out


def assert_backends_agree(out, atol=5e-5):
    (lt, ct, kt), (lr, cr, kr) = out["torch"], out["triton"]
    torch.testing.assert_close(lr, lt, atol=atol, rtol=1e-4)
    torch.testing.assert_close(cr, ct, atol=atol, rtol=1e-4)
    for a, b in zip(kr, kt):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


@pytest.fixture
def kernels(monkeypatch):
    return {
        "norm": Spy(monkeypatch, triton_norm, ["rms_norm", "add_rms_norm"]),
        "act": Spy(monkeypatch, triton_activation, ["silu_and_mul"]),
        "rope": Spy(monkeypatch, triton_rope, ["apply_rope"]),
        "attention": Spy(monkeypatch, triton_attention, ["decode_attention"]),
        "mxfp4": Spy(monkeypatch, triton_mxfp4, ["mxfp4_matmul"]),
        "moe": Spy(monkeypatch, triton_moe, ["grouped_mxfp4_matmul", "moe_sum"]),
    }


@requires_triton
@interpreted
def test_triton_backend_dense_model(tmp_path, kernels):
    model = ours_from_hf(hf_model("qwen3", seed=6, num_hidden_layers=2), tmp_path)
    assert_backends_agree(forward_both(model))
    calls = {k: sum(s.calls.values()) for k, s in kernels.items()}
    # q/k norms and the fused add+norms, SwiGLU, rope on q and k, attention: per layer, in the triton run only.
    assert kernels["norm"].calls["add_rms_norm"] == 2 * 2
    assert calls["act"] == 2 and calls["rope"] == 2 * 2 and calls["attention"] == 2
    assert calls["mxfp4"] == 0 and calls["moe"] == 0


@requires_triton
@interpreted
def test_triton_backend_mxfp4_dense_mlp(tmp_path, kernels):
    model = quantize_experts(ours_from_hf(hf_model("qwen2", seed=7, num_hidden_layers=2, intermediate_size=64),
                                          tmp_path))
    assert isinstance(model.layers[0].mlp.gate_up_proj, MXFP4Linear)
    assert_backends_agree(forward_both(model), atol=1e-4)
    assert kernels["mxfp4"].calls["mxfp4_matmul"] == 2 * 2


@requires_triton
@interpreted
def test_triton_backend_mxfp4_moe(tmp_path, kernels):
    model = quantize_experts(ours_from_hf(hf_model("qwen3_moe", seed=8, num_hidden_layers=2), tmp_path))
    assert isinstance(model.layers[1].mlp.experts, MXFP4Experts)
    assert_backends_agree(forward_both(model), atol=1e-4)
    assert kernels["moe"].calls == {"grouped_mxfp4_matmul": 2, "moe_sum": 1}     # layer 0 is dense


@requires_triton
@interpreted
def test_triton_backend_sinks_and_windows_fall_back(tmp_path, kernels):
    """MiMo: its sliding layers (window, sinks) attend through the torch path, its full layer through the kernel."""
    model = ours_from_hf(hf_model("mimo_v2_flash", seed=9), tmp_path)
    assert_backends_agree(forward_both(model))
    assert kernels["attention"].calls["decode_attention"] == 1


@requires_triton
@interpreted
def test_triton_backend_speculative_step(tmp_path, kernels):
    target = ours_from_hf(hf_model("qwen3", seed=10, num_hidden_layers=2), tmp_path)
    drafter = DFlashDrafter(DFlashConfig.for_target(target.config, num_layers=1, num_features=1, block_size=3))
    init_random(drafter, 0)
    drafter.requires_grad_(False)
    results = {}
    for name in ("torch", "triton"):
        cache = target.new_cache(2, 24)
        draft_cache = new_draft_cache(drafter, 2, 24)
        logits, features = prefill_rows(target, cache, [[1, 2, 3], [4, 5, 6, 7, 8]], drafter.config.target_layer_ids)
        for row, captured in enumerate(features):
            append_context(drafter, draft_cache, row, features_of(captured))
        step = SpeculativeStep(target, drafter, cache, copy.deepcopy(draft_cache), 2, be.choose_backend("cpu", name))
        load_rows(step, logits.argmax(-1).tolist(), cache.lengths[:2].tolist())
        results[name] = step.step()
    assert results["triton"][0].tolist() == results["torch"][0].tolist()
    torch.testing.assert_close(results["triton"][1], results["torch"][1], atol=5e-5, rtol=1e-4)
    assert kernels["attention"].calls["decode_attention"] == 2 + 1     # target layers + drafter layer
