"""The slicing alone, in one process: every rank's slice of a module run on the same input, summed over ranks,
equals the unsliced module (what the all-reduce computes in a real run). Cheap, and names the module that breaks."""

import copy

import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.engine.kv_cache import KVCache
from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.moe import SparseMoE
from ultraspeed.parallel import ParallelPlan, parallelize
from ultraspeed.parallel.ep import shard_experts
from ultraspeed.parallel.tp import shard_attention, shard_expert_features, shard_mlp

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    names = {"qwen3_moe": {}, "mimo_v2_flash": {}, "llama": dict(num_attention_heads=8, num_key_value_heads=2)}
    return {n: ours_from_hf(hf_model(n, seed=3, **kw), tmp_path_factory.mktemp(n)) for n, kw in names.items()}


def summed_over_ranks(module, shard, world, run):
    total = None
    for rank in range(world):
        part = copy.deepcopy(module)
        shard(part, rank, world)
        out = run(part)
        total = out if total is None else total + out
    return total


@pytest.mark.parametrize("name,world", [("qwen3_moe", 2), ("llama", 2), ("llama", 4), ("mimo_v2_flash", 2),
                                        ("mimo_v2_flash", 4)])
def test_attention_heads_split(models, name, world):
    """Covers KV heads split over ranks, a KV head replicated onto several ranks (mimo, llama 4 ranks), qk-norm,
    q/k/v bias and per-head sinks."""
    model = models[name]
    torch.manual_seed(0)
    x = torch.randn(1, 5, model.config.hidden_size)
    for i, layer in enumerate(model.layers):
        step = model.step_context(model.new_cache(1, 16), 1, 5)

        def run(attn):
            cache = KVCache.allocate([attn.kv_shape()], 1, 16)
            return attn(x, step, cache, 0)

        with torch.no_grad():
            torch.testing.assert_close(summed_over_ranks(layer.self_attn, shard_attention, world, run),
                                       run(layer.self_attn), atol=1e-5, rtol=1e-5)
        kv_heads = layer.self_attn.num_kv_heads
        part = copy.deepcopy(layer.self_attn)
        shard_attention(part, 1, world)
        assert part.kv_shape()[0] == max(1, kv_heads // world)      # the cache per rank holds only its heads


def test_dense_mlp_features_split(models):
    mlp = models["llama"].layers[0].mlp
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(summed_over_ranks(mlp, shard_mlp, 2, lambda m: m(x)), mlp(x),
                                   atol=1e-5, rtol=1e-5)


def shard_moe(by_expert):
    def shard(moe, rank, world):
        if by_expert:
            moe.experts = shard_experts(moe.experts, rank, world)
        else:
            shard_expert_features(moe.experts, rank, world)
        if moe.shared_experts is not None:
            shard_mlp(moe.shared_experts, rank, world)
    return shard


@pytest.mark.parametrize("name", ["qwen3_moe", "mimo_v2_flash"])
@pytest.mark.parametrize("by_expert", [True, False], ids=["ep", "tp"])
def test_moe_split(models, name, by_expert):
    moe = next(layer.mlp for layer in models[name].layers if isinstance(layer.mlp, SparseMoE))
    x = torch.randn(2, 7, moe.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(summed_over_ranks(moe, shard_moe(by_expert), 2, lambda m: m(x)), moe(x),
                                   atol=1e-5, rtol=1e-5)


def test_expert_shard_owns_a_contiguous_block(models):
    moe = next(layer.mlp for layer in models["qwen3_moe"].layers if isinstance(layer.mlp, SparseMoE))
    shard = shard_experts(copy.deepcopy(moe.experts), 1, 2)
    assert (shard.first, shard.local.num_experts) == (3, 3)
    torch.testing.assert_close(shard.local.down_proj, moe.experts.down_proj[3:])


@pytest.fixture(scope="module")
def mxfp4_models(tmp_path_factory):
    """Packed MXFP4 weights: a dense MLP (gate_up/down as MXFP4Linear) and MoE experts (MXFP4Experts), sized so
    that a 2-way split of the intermediate features falls on 32-column block boundaries."""
    from ultraspeed.quant.apply import quantize_experts
    dense = ours_from_hf(hf_model("llama", seed=4, intermediate_size=128), tmp_path_factory.mktemp("dense4"))
    moe = ours_from_hf(hf_model("qwen3_moe", seed=4, moe_intermediate_size=64), tmp_path_factory.mktemp("moe4"))
    return quantize_experts(dense), quantize_experts(moe)


def test_mxfp4_mlp_split(mxfp4_models):
    mlp = mxfp4_models[0].layers[0].mlp
    assert type(mlp.down_proj).__name__ == "MXFP4Linear"
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(summed_over_ranks(mlp, shard_mlp, 2, lambda m: m(x)), mlp(x),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("by_expert", [True, False], ids=["ep", "tp"])
def test_mxfp4_moe_split(mxfp4_models, by_expert):
    moe = next(layer.mlp for layer in mxfp4_models[1].layers if isinstance(layer.mlp, SparseMoE))
    assert type(moe.experts).__name__ == "MXFP4Experts"
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(summed_over_ranks(moe, shard_moe(by_expert), 2, lambda m: m(x)), moe(x),
                                   atol=1e-5, rtol=1e-5)


def test_mxfp4_split_inside_a_block_is_refused(mxfp4_models):
    experts = copy.deepcopy(next(layer.mlp for layer in mxfp4_models[1].layers
                                 if isinstance(layer.mlp, SparseMoE)).experts)
    with pytest.raises(UltraSpeedError, match="multiples of 32"):
        shard_expert_features(experts, 0, 4)          # 64 / 4 = 16 features per rank


def test_plans_that_cannot_work_are_refused(models):
    with pytest.raises(UltraSpeedError, match="same size"):
        ParallelPlan(tp=2, ep=4)
    with pytest.raises(UltraSpeedError, match="needs 2 processes"):
        ParallelPlan(tp=2).check_world(3)
    with pytest.raises(UltraSpeedError, match="no MoE layers"):
        parallelize(copy.deepcopy(models["llama"]), ParallelPlan(ep=2), 0, 2)
    with pytest.raises(UltraSpeedError, match="KV heads"):
        shard_attention(copy.deepcopy(models["llama"].layers[0].self_attn), 0, 3)
    with pytest.raises(UltraSpeedError, match="experts"):
        shard_experts(copy.deepcopy(models["qwen3_moe"].layers[1].mlp.experts), 0, 4)
