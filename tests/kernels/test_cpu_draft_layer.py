"""The drafter's fused CPU layers (kernels/cpu_draft_layer.py) compute what its PyTorch layers compute: the same
block hidden states and drafts for rows of different context lengths, bidirectional or causal blocks, with or
without a sliding window; they leave each row's context in the draft cache untouched; speculative decoding with
them stays exactly plain greedy decoding; and they step aside when their parameters moved."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_speculative import decode_batch, plain_tokens
from tests.helpers import hf_model, ours_from_hf
from ultraspeed.engine import speculative
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.kernels import cpu_gemm
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random, with_block_size
from ultraspeed.quant.int8 import match_drafter_weights

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not cpu_gemm.is_available(), reason="compiled CPU kernels unavailable")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return ours_from_hf(hf_model("qwen3", seed=5), tmp_path_factory.mktemp("qwen3"))


def served_drafter(target, block_size=8, **kw) -> DFlashDrafter:
    d = DFlashDrafter(DFlashConfig.for_target(target.config, num_layers=2, num_features=2, block_size=block_size,
                                              **kw))
    init_random(d, seed=1, std=0.2)          # large enough that attention over the context is far from uniform
    d.requires_grad_(False)
    match_drafter_weights(d, "int8", target)
    assert d.fused_layers is not None
    return d


def filled_draft_cache(drafter, lengths: list[int]):
    """Draft cache rows with contexts of the given lengths, from random target features."""
    g = torch.Generator().manual_seed(0)
    cache = speculative.new_draft_cache(drafter, len(lengths), 64)
    width = len(drafter.config.target_layer_ids) * drafter.config.hidden_size
    with torch.inference_mode():
        for row, n in enumerate(lengths):
            speculative.append_context(drafter, cache, row, torch.randn(1, n, width, generator=g))
    return cache


@pytest.mark.parametrize("window, causal", [(None, False), (5, False), (None, True)],
                         ids=["bidirectional", "window-5", "causal-in-block"])
@torch.inference_mode()
def test_fused_draft_layers_match_the_pytorch_layers(target, window, causal):
    drafter = served_drafter(target, window=window, causal_in_block=causal)
    cache = filled_draft_cache(drafter, [9, 3, 17])
    starts = cache.lengths[:3].clone()
    context = [(k.clone(), v.clone()) for k, v in zip(cache.keys, cache.values)]
    anchors = torch.tensor([5, 77, 12])
    embeds = drafter.block_embeddings(target.embed_tokens(anchors).view(3, 1, -1))
    want = drafter(embeds, *speculative._block_inputs(drafter, cache, starts))     # PyTorch, padded and masked
    got = drafter.norm(drafter.fused_layers(embeds, cache, starts))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for (k0, v0), k1, v1 in zip(context, cache.keys, cache.values):        # every row's context is as it was
        for row, n in enumerate(starts.tolist()):
            assert torch.equal(k1[row, :, :n], k0[row, :, :n]) and torch.equal(v1[row, :, :n], v0[row, :, :n])
    # draft_block takes the fused path and drafts what the PyTorch layers draft.
    fused_drafts, fused_confidence = speculative.draft_block(drafter, target, cache, anchors)
    drafter.fused_layers, layers = None, drafter.fused_layers
    drafts, confidence = speculative.draft_block(drafter, target, cache, anchors)
    drafter.fused_layers = layers
    assert torch.equal(fused_drafts, drafts)
    torch.testing.assert_close(fused_confidence, confidence, rtol=1e-4, atol=1e-5)


@torch.inference_mode()
def test_speculative_decoding_with_fused_draft_layers_equals_plain_decoding(target, monkeypatch):
    drafter = served_drafter(target, block_size=5)
    calls = []
    real = type(drafter.fused_layers).__call__
    monkeypatch.setattr(type(drafter.fused_layers), "__call__", lambda *a: calls.append(1) or real(*a))
    prompts = [[3, 17, 42, 9], [100, 5, 6, 7, 8, 9, 10, 11, 12], [55, 66]]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    outputs, _, _ = decode_batch(target, drafter, prompts, params)
    for prompt, out in zip(prompts, outputs):
        assert out[:20] == plain_tokens(target, prompt, params)
    assert calls                                   # the fused layers drafted
    # A block size set at serving time shares the fused layers.
    assert with_block_size(drafter, 3).fused_layers is drafter.fused_layers
    got = sum(speculative.generate_speculative(target, with_block_size(drafter, 3), [1, 2, 3], params), [])
    assert got == plain_tokens(target, [1, 2, 3], params)


@torch.inference_mode()
def test_fused_draft_layers_step_aside_when_they_cannot_run(target):
    drafter = served_drafter(target, block_size=8)
    cache = filled_draft_cache(drafter, [4, 60])
    embeds = torch.zeros(2, 8, drafter.config.hidden_size)
    assert drafter.fused_layers.accepts(drafter, embeds[:1], cache, 8)
    assert not drafter.fused_layers.accepts(drafter, embeds, cache, 8)      # row 1: no room for the block
    assert not drafter.fused_layers.accepts(drafter, embeds[:1].double(), cache, 8)
    drafter.to(torch.float64).to(torch.float32)            # parameters re-allocated: the pointers are stale
    assert not drafter.fused_layers.accepts(drafter, embeds[:1], cache, 8)
