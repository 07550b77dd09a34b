"""The fused CPU decoder layer (kernels/cpu_layer.py, one C++ call per layer) computes what the PyTorch layer it
replaces computes: the same logits to float rounding for decode steps, verify blocks and short prefills, rows at
different lengths and rows past the first, sliding windows and QK-norm; the layer outputs a forward captures are
not overwritten by later layers; greedy decoding gives the same tokens; an MXFP4 MLP beside int8 attention too;
and layers it does not support keep their PyTorch code."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.engine.generate import generate_plain
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.kernels import cpu_gemm
from ultraspeed.kernels.cpu_layer import MAX_TOKENS, FusedDenseLayer, fuse_dense_layers
from ultraspeed.quant.apply import quantize_experts
from ultraspeed.quant.int8 import use_int8_weights

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not cpu_gemm.is_available(), reason="compiled CPU kernels unavailable")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Per architecture: (int8 model on its PyTorch layers, the same with fused layers)."""
    made = {}

    def get(arch: str):
        if arch not in made:
            base, _, mlp = arch.partition("+")
            model = ours_from_hf(hf_model(base, seed=3), tmp_path_factory.mktemp(base))
            if mlp == "mxfp4":
                quantize_experts(model)          # the MLP packed in MXFP4, as the ultraspeed tier serves it
            use_int8_weights(model)
            fused = copy.deepcopy(model)
            assert fuse_dense_layers(fused) == model.config.num_layers
            made[arch] = model, fused
        return made[arch]
    return get


# plain / QK-norm / sliding window of 7 / int8 attention with an MXFP4 MLP
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "qwen3+mxfp4"])
@torch.inference_mode()
def test_fused_layers_match_the_pytorch_layers(pair, arch):
    model, fused = pair(arch)
    caches = model.new_cache(3, 64), fused.new_cache(3, 64)
    # Prompts of different lengths into rows 0 and 1 (row 1 through first_row), one fused and one too long to be.
    prompts = [[3, 17, 42, 9, 100, 5], [(7 * i) % 120 + 1 for i in range(MAX_TOKENS + 5)]]
    for row, prompt in enumerate(prompts):
        outs = [m(torch.tensor([prompt]), c, (0, 1), first_row=row) for m, c in zip((model, fused), caches)]
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
        for want, got in zip(outs[0][1], outs[1][1]):          # captured layer outputs, not overwritten later
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Decode steps and a verify block of 4 over both rows at once (their positions differ by 15).
    for ids in ([[11], [12]], [[13], [14]], [[1, 2, 3, 4], [4, 3, 2, 1]], [[5], [6]]):
        logits = [m.logits(m(torch.tensor(ids), c)[0]) for m, c in zip((model, fused), caches)]
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist()
    for k0, k1 in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        n = int(caches[0].lengths.max())
        torch.testing.assert_close(k1[:2, :, :n], k0[:2, :, :n], rtol=1e-5, atol=1e-5)


def test_greedy_decoding_is_unchanged(pair):
    model, fused = pair("qwen3")
    prompt, params = [3, 17, 42, 9], SamplingParams(max_tokens=40, ignore_eos=True)
    assert sum(generate_plain(fused, prompt, params), []) == sum(generate_plain(model, prompt, params), [])


def test_only_supported_layers_are_fused(tmp_path):
    moe = ours_from_hf(hf_model("qwen3_moe", seed=1), tmp_path / "moe")
    sinks = ours_from_hf(hf_model("mimo_v2_flash", seed=1), tmp_path / "mimo")
    for model in (moe, sinks):
        use_int8_weights(model)
        dense_layers = sum(type(layer.mlp).__name__ == "DenseMLP" for layer in model.layers)
        assert fuse_dense_layers(model) <= dense_layers
    assert fuse_dense_layers(sinks) == 0            # sinks, attention bias: none of its layers
    fp32 = ours_from_hf(hf_model("llama", seed=1), tmp_path / "fp32")
    assert fuse_dense_layers(fp32) == 0             # fp32 weights: the PyTorch matmuls stay
    assert not any(isinstance(layer, FusedDenseLayer) for layer in fp32.layers)


@torch.inference_mode()
def test_weights_replaced_after_the_swap_fall_back_to_pytorch(pair):
    """A norm weight re-allocated after fusing (a dtype round trip, a new Parameter) must not be read through
    the stale pointer: the layer takes its PyTorch path, which sees the new weight."""
    model, fused = (copy.deepcopy(m) for m in pair("llama"))
    for m in (model, fused):
        m.layers[0].input_layernorm.weight = torch.nn.Parameter(m.layers[0].input_layernorm.weight * 2.0)
    ids = torch.tensor([[3, 17, 42]])
    want, got = (m.logits(m(ids, m.new_cache(1, 16))[0]) for m in (model, fused))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
