"""The static-shape steps (ultraspeed/runtime/static_step.py) compute what the dynamic path computes: same logits
to float rounding, same greedy tokens, for plain decoding of rows at different lengths and for greedy DFlash
speculative decoding (random drafts, oracle drafts accepted in part or in full, windowed / causal drafters) on
every attention / MLP family. And they read nothing back to the host: the whole step runs on the meta device."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.engine import speculative
from ultraspeed.engine.batch_generate import generate_batch
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random
from ultraspeed.models.moe import Experts
from ultraspeed.quant.apply import quantize_experts
from ultraspeed.runtime.graphs import load_rows
from ultraspeed.runtime.loop import decode_greedy, prefill_rows, speculative_greedy
from ultraspeed.runtime.static_step import DecodeStep, SpeculativeStep, committed_tokens

pytest.importorskip("transformers")

ARCHS = ["qwen3", "mistral", "qwen3_moe", "mimo_v2_flash", "deepseek_v3"]
PROMPTS = [[3, 17, 42, 9, 100, 5], [7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = ours_from_hf(hf_model(name, seed=3), tmp_path_factory.mktemp(name))
        return cache[name]
    return get


def make_drafter(target, block_size=4, seed=0, **kw):
    d = DFlashDrafter(DFlashConfig.for_target(target.config, num_layers=1, num_features=2, block_size=block_size,
                                              **kw))
    init_random(d, seed)
    return d.requires_grad_(False)


def greedy(model, prompts, n):
    return generate_batch(model, prompts, SamplingParams(max_tokens=n, ignore_eos=True), max_batch=len(prompts))


# ---------------------------------------------------------------------------------------------- plain decode


@pytest.mark.parametrize("arch", ARCHS)
def test_static_decode_logits_and_tokens_match_dynamic(models, arch):
    """Rows of different lengths, step by step: the dynamic batched forward and the static step see the same
    tokens and produce the same logits."""
    model = models(arch)
    n, steps = len(PROMPTS), 6
    dyn_cache = model.new_cache(n, 40)
    logits, _ = prefill_rows(model, dyn_cache, PROMPTS)
    static_cache = copy.deepcopy(dyn_cache)
    tokens = logits.argmax(-1)
    step = DecodeStep(model, static_cache, n)
    load_rows(step, tokens.tolist(), dyn_cache.lengths[:n].tolist())
    for _ in range(steps):
        with torch.no_grad():
            hidden, _ = model(tokens.view(n, 1), dyn_cache)
            ref = model.logits(hidden[:, -1])
        got_tokens, got = step.step()
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
        tokens = ref.argmax(-1)
        assert got_tokens.tolist() == tokens.tolist()
        assert step.tokens.view(-1).tolist() == tokens.tolist()
    assert step.lengths.tolist() == dyn_cache.lengths[:n].tolist()
    # The committed KV entries are the same too (positions past a row's length are not compared: stale).
    for layer in range(len(model.layers)):
        for row in range(n):
            length = int(dyn_cache.lengths[row])
            torch.testing.assert_close(static_cache.keys[layer][row, :, :length],
                                       dyn_cache.keys[layer][row, :, :length], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "deepseek_v3"])
def test_decode_greedy_equals_batched_dynamic(models, arch):
    model = models(arch)
    assert decode_greedy(model, PROMPTS, 12) == greedy(model, PROMPTS, 12)


def test_mxfp4_experts_static_equals_dynamic(tmp_path):
    model = quantize_experts(ours_from_hf(hf_model("qwen3_moe", seed=4), tmp_path))
    assert decode_greedy(model, PROMPTS, 10) == greedy(model, PROMPTS, 10)


def test_padded_bucket_rows_do_not_change_real_rows(models):
    """A step of batch 4 running 2 rows (rows 2, 3 padded at length 0) gives the 2 rows' own results."""
    model = models("qwen3")
    prompts = PROMPTS[:2]
    cache = model.new_cache(4, 40)
    logits, _ = prefill_rows(model, cache, prompts)
    padded = DecodeStep(model, copy.deepcopy(cache), 4)
    exact = DecodeStep(model, copy.deepcopy(cache), 2)
    first = logits.argmax(-1).tolist()
    load_rows(padded, first, cache.lengths[:2].tolist())
    load_rows(exact, first, cache.lengths[:2].tolist())
    assert padded.lengths.tolist()[2:] == [0, 0]
    for _ in range(4):
        a, la = padded.step()
        b, lb = exact.step()
        assert a[:2].tolist() == b.tolist()
        torch.testing.assert_close(la[:2], lb, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- speculative decode


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "mimo_v2_flash", "deepseek_v3"])
def test_speculative_greedy_equals_plain_greedy(models, arch):
    model = models(arch)
    assert speculative_greedy(model, make_drafter(model), PROMPTS, 14) == greedy(model, PROMPTS, 14)


def test_static_speculative_step_matches_dynamic_step(models, monkeypatch):
    """Two rows at different lengths, step by step: same drafts, same verify logits, same committed tokens."""
    target = models("qwen3")
    drafter = make_drafter(target, block_size=5, seed=2)
    prompts = PROMPTS[:2]
    n, layers = len(prompts), drafter.config.target_layer_ids
    cache = target.new_cache(n, 64)
    draft_cache = speculative.new_draft_cache(drafter, n, 64)
    logits, features = prefill_rows(target, cache, prompts, layers)
    static_cache, static_draft_cache = copy.deepcopy(cache), copy.deepcopy(draft_cache)
    for row, captured in enumerate(features):
        speculative.append_context(drafter, static_draft_cache, row, speculative.features_of(captured))
    pending = [speculative.features_of(captured) for captured in features]
    anchors = logits.argmax(-1).tolist()
    step = SpeculativeStep(target, drafter, static_cache, static_draft_cache, n)
    load_rows(step, anchors, cache.lengths[:n].tolist())

    seen = {}
    real_draft_block, real_logits = speculative.draft_block, target.logits
    monkeypatch.setattr(speculative, "draft_block", lambda *a: seen.setdefault("drafts", real_draft_block(*a)))
    monkeypatch.setattr(target, "logits", lambda h: seen.setdefault("logits", real_logits(h)))
    params, generators = [SamplingParams()] * n, [None] * n
    for _ in range(6):
        seen.clear()
        with torch.no_grad():
            committed, pending, _, _ = speculative.speculative_step(target, drafter, cache, draft_cache, anchors,
                                                                 pending, params, generators)
        seen_dynamic = dict(seen)
        seen.clear()
        drafts = step.draft()
        assert drafts.tolist() == seen_dynamic["drafts"][0].tolist()
        result, verify_logits = step.verify(drafts)
        torch.testing.assert_close(verify_logits, seen_dynamic["logits"], atol=2e-5, rtol=1e-5)
        assert committed_tokens(result) == committed
        anchors = [c[-1] for c in committed]
        assert step.anchors.tolist() == anchors
        assert step.lengths.tolist() == cache.lengths[:n].tolist()


class OracleStep(SpeculativeStep):
    """Drafts the true greedy continuation (computed on the device from `lengths`), wrong in one slot of row 0
    every third step: full blocks, partial acceptance and rejections all happen."""

    truth: torch.Tensor
    prompt_lens: torch.Tensor

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls = 0

    def draft(self):
        self.calls += 1
        B = self.block_size
        index = (self.lengths - self.prompt_lens).view(-1, 1) + 1 + torch.arange(B - 1).view(1, -1)
        drafts = self.truth.gather(1, index).clone()
        if self.calls % 3 == 0:
            slot = self.calls % (B - 1)
            drafts[0, slot] = (drafts[0, slot] + 1) % self.target.config.vocab_size
        return drafts


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_oracle_drafts_accepted_and_output_unchanged(models, arch):
    target = models(arch)
    B, n_new = 5, 24
    truth = greedy(target, PROMPTS, n_new + 2 * B)
    OracleStep.truth = torch.tensor(truth)
    OracleStep.prompt_lens = torch.tensor([len(p) for p in PROMPTS])
    stats = {}
    got = speculative_greedy(target, make_drafter(target, B), PROMPTS, n_new, step_class=OracleStep, stats=stats)
    assert got == [t[:n_new] for t in truth]
    per_step = [a for step in stats["accepted"] for a in step]
    assert max(per_step) == B                       # whole blocks accepted
    assert any(1 < a < B for a in per_step)         # and partial ones
    assert stats["steps"] < n_new / 2


class SplitOracleStep(OracleStep):
    """Row 0 always drafts the true continuation (a whole block per step); the other rows always miss their
    first slot (one token per step), so row 0 runs far ahead while they catch up."""

    def draft(self):
        B = self.block_size
        index = (self.lengths - self.prompt_lens).view(-1, 1) + 1 + torch.arange(B - 1).view(1, -1)
        drafts = self.truth.gather(1, index).clone()
        drafts[1:, 0] = (drafts[1:, 0] + 1) % self.target.config.vocab_size
        return drafts


def test_a_row_far_ahead_of_the_others_fits_in_the_cache(models):
    target = models("qwen3")
    B, n_new = 4, 8
    truth = greedy(target, PROMPTS, (n_new + 1) * B)
    SplitOracleStep.truth = torch.tensor(truth)
    SplitOracleStep.prompt_lens = torch.tensor([len(p) for p in PROMPTS])
    stats = {}
    got = speculative_greedy(target, make_drafter(target, B), PROMPTS, n_new, step_class=SplitOracleStep,
                             stats=stats)
    assert got == [t[:n_new] for t in truth]
    assert [step[0] for step in stats["accepted"]] == [B] * (n_new - 1)   # row 0: (n_new - 1) * B tokens
    assert all(a == 1 for step in stats["accepted"] for a in step[1:])


@pytest.mark.parametrize("kw", [dict(window=3), dict(causal_in_block=True), dict(window=4, causal_in_block=True)])
def test_windowed_and_causal_drafters(models, kw):
    """The static draft mask equals DFlash's block_mask: same drafts as the dynamic drafter, same output."""
    target = models("qwen3")
    drafter = make_drafter(target, block_size=4, seed=1, **kw)
    cache = target.new_cache(1, 40)
    draft_cache = speculative.new_draft_cache(drafter, 1, 40)
    logits, features = prefill_rows(target, cache, PROMPTS[2:], drafter.config.target_layer_ids)
    speculative.append_context(drafter, draft_cache, 0, speculative.features_of(features[0]))
    step = SpeculativeStep(target, drafter, cache, copy.deepcopy(draft_cache), 1)
    anchor = int(logits.argmax(-1))
    load_rows(step, [anchor], cache.lengths[:1].tolist())
    with torch.no_grad():
        ref, _ = speculative.draft_block(drafter, target, draft_cache, torch.tensor([anchor]))
    assert step.draft().tolist() == ref.tolist()
    assert speculative_greedy(target, drafter, PROMPTS, 10) == greedy(target, PROMPTS, 10)


def test_the_step_without_drafter_verifies_lookup_drafts_only(models):
    """`without_drafter()` shares the step's buffers and caches and never runs the drafter: a right lookup draft
    commits a whole block, a wrong one (or none) only the bonus token, and alternating with the drafter's step
    on the same buffers still gives plain greedy output."""
    target = models("qwen3")
    B = 4
    drafter = make_drafter(target, B)
    prompt = PROMPTS[2]
    truth = greedy(target, [prompt], 12 * B + 1)[0]
    cache = target.new_cache(1, 64)
    draft_cache = speculative.new_draft_cache(drafter, 1, 64)
    logits, features = prefill_rows(target, cache, [prompt], drafter.config.target_layer_ids)
    speculative.append_context(drafter, draft_cache, 0, speculative.features_of(features[0]))
    step = SpeculativeStep(target, drafter, cache, draft_cache, 1)
    twin = step.without_drafter()
    assert twin.anchors is step.anchors and twin.lengths is step.lengths and step.runs_drafter
    twin.draft = lambda: pytest.fail("the step without drafter ran the drafter")
    load_rows(step, [int(logits.argmax(-1))], [len(prompt)])
    got, committed_per_step = [int(logits.argmax(-1))], []
    for i in range(12):
        done = len(got)
        lookup = truth[done:done + B - 1]
        if i % 3 == 1:
            lookup = [(lookup[0] + 1) % target.config.vocab_size] + lookup[1:]      # wrong from the first slot
        step.load_lookups([lookup if i % 3 != 2 else []])
        result, _ = (twin if i % 3 != 2 else step).step()
        tokens = committed_tokens(result)[0]
        got += tokens
        committed_per_step.append(len(tokens))
    assert got == truth[:len(got)]
    assert committed_per_step[0::3] == [B] * 4 and committed_per_step[1::3] == [1] * 4


# ------------------------------------------------------------------------------------------- no host reads


@pytest.mark.parametrize("arch", ARCHS)
def test_steps_run_on_the_meta_device(models, arch):
    """On the meta device every tensor has a shape and no data: any read back to the host (.item(), .tolist(),
    int(t)), any data-dependent shape (nonzero, bincount, unique) and any tensor made on the host would fail.
    So a step that runs here can be captured as a CUDA graph."""
    model = copy.deepcopy(models(arch))
    if model.config.is_moe:
        quantize_experts(model)
    model = model.to("meta")
    drafter = make_drafter(models(arch)).to("meta")
    cache = model.new_cache(2, 32)
    draft_cache = speculative.new_draft_cache(drafter, 2, 32)
    assert cache.keys[0].is_meta and draft_cache.keys[0].is_meta
    for sampling in (False, True):
        next_tokens, logits = DecodeStep(model, cache, 2, sampling=sampling).step()
        assert logits.is_meta and logits.shape == (2, model.config.vocab_size) and next_tokens.shape == (2,)
        step = SpeculativeStep(model, drafter, cache, draft_cache, 2, sampling=sampling)
        result, logits = step.step()
        assert result.shape == (2, drafter.config.block_size + 1) and result.is_meta


def test_meta_device_catches_host_reads(models):
    """The check above has teeth: the dynamic MoE (which groups tokens by expert on the host) fails there."""
    experts = copy.deepcopy(models("qwen3_moe")).to("meta").layers[1].mlp.experts
    assert type(experts) is Experts
    x = torch.empty(3, experts.gate_up_proj.shape[-1], device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        experts(x, torch.empty(3, 2, device="meta"), torch.zeros(3, 2, dtype=torch.long, device="meta"))
    for read in (lambda t: int(t[0]), lambda t: t.tolist(), lambda t: t.nonzero()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read(torch.ones(2, dtype=torch.long, device="meta"))
