"""Sampling inside the static steps (runtime/device_sampling.py, runtime/static_step.py): per-row distributions
equal the dynamic sampler's, the hashed uniforms are uniform and reproducible, greedy rows stay greedy, and a
sampled static step, plain or speculative (drafts from the drafter or from lookup), emits tokens that follow the
target's distribution: chi-square tests over thousands of rows that share one prompt and differ in their seeds."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.engine.test_speculative import chi_square_p_value
from tests.helpers import hf_model, ours_from_hf
from ultraspeed.engine import speculative
from ultraspeed.engine.generate import GenerationStats, generate_plain
from ultraspeed.engine.sampler import SamplingParams, token_distribution
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random
from ultraspeed.runtime.device_sampling import ACCEPT, DRAW, SamplingBuffers, counter_uniform, row_distribution
from ultraspeed.runtime.graphs import load_rows
from ultraspeed.runtime.loop import generate_static, prefill_rows
from ultraspeed.runtime.static_step import DecodeStep, SpeculativeStep, committed_tokens

pytest.importorskip("transformers")

PROMPT = [3, 17, 42, 9, 100, 5]
ROWS = 6000


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    model = ours_from_hf(hf_model("qwen3", seed=5), tmp_path_factory.mktemp("qwen3"))
    with torch.no_grad():       # logits 5x larger: peaked distributions, like a trained model's, not flat ones
        model.norm.weight.mul_(5.0)
    return model


def make_drafter(target, block_size=4):
    d = DFlashDrafter(DFlashConfig.for_target(target.config, num_layers=1, num_features=2, block_size=block_size))
    init_random(d, 0)
    return d.requires_grad_(False)


PARAMS = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9),
          SamplingParams(temperature=1.3, top_k=5), SamplingParams(temperature=0.5, top_k=20, top_p=0.5),
          SamplingParams(temperature=2.0, top_p=0.3), SamplingParams(temperature=1e-30),
          SamplingParams(temperature=1.0, top_p=1e-300)]


def test_row_distribution_is_token_distribution_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(len(PARAMS), 3, 300) * 3
    logits[3, 0, :4] = logits[3, 0].max() + 1     # ties at the top
    buffers = SamplingBuffers(len(PARAMS), "cpu")
    buffers.load(PARAMS, [0] * len(PARAMS))
    got = buffers.distribution(logits)
    for row, params in enumerate(PARAMS):
        torch.testing.assert_close(got[row], token_distribution(logits[row], params), atol=1e-6, rtol=1e-5)


def test_hashed_uniforms_are_uniform_reproducible_and_distinct():
    seeds = torch.tensor([0, 1, 2**40 + 7, 2**62 + 3])
    positions = torch.arange(5000).view(1, -1).expand(4, -1)
    u = counter_uniform(seeds, positions, DRAW)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert torch.equal(u, counter_uniform(seeds, positions, DRAW))
    assert not torch.equal(u, counter_uniform(seeds, positions, ACCEPT))
    for row in range(4):                                   # each seed's stream: 20 equal bins
        counts = torch.histc(u[row], bins=20, min=0, max=1)
        assert chi_square_p_value(counts, torch.full((20,), 0.05)) > 1e-3
    # Distinct seeds give uncorrelated streams, and so do neighbouring positions.
    flat = u - 0.5
    assert abs(float((flat[0] * flat[1]).mean())) < 0.01
    assert abs(float((flat[0, 1:] * flat[0, :-1]).mean())) < 0.01


def test_one_hot_rejection_rule_is_greedy_acceptance():
    torch.manual_seed(1)
    logits = torch.randn(50, 5, 12)
    drafts = torch.where(torch.rand(50, 4) < 0.7, logits[:, :-1].argmax(-1), torch.randint(0, 12, (50, 4)))
    probs = torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    got = speculative.rejection_sample(drafts, probs, torch.rand(50, 4), torch.rand(50, 5))
    want = speculative.accept_greedy(drafts, logits)
    assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()


def replicated(target, drafter, rows, block):
    """Caches of `rows` rows that all hold PROMPT (one prefill, copied), the prefill's last logits and the first
    greedy token."""
    cache = target.new_cache(rows, len(PROMPT) + block + 2)
    one = target.new_cache(1, cache.max_len)
    layers = drafter.config.target_layer_ids if drafter is not None else ()
    logits, features = prefill_rows(target, one, [PROMPT], layers)
    for keys, values, k, v in zip(cache.keys, cache.values, one.keys, one.values):
        keys.copy_(k.expand_as(keys))
        values.copy_(v.expand_as(values))
    cache.lengths.fill_(len(PROMPT))
    draft_cache = None
    if drafter is not None:
        draft_cache = speculative.new_draft_cache(drafter, rows, cache.max_len)
        single = speculative.new_draft_cache(drafter, 1, cache.max_len)
        speculative.append_context(drafter, single, 0, speculative.features_of(features[0]))
        for keys, values, k, v in zip(draft_cache.keys, draft_cache.values, single.keys, single.values):
            keys.copy_(k.expand_as(keys))
            values.copy_(v.expand_as(values))
    return cache, draft_cache, int(logits[0].argmax())


def load_seeded(step, params, rows):
    step.sampling.load([params] * rows, [1000 + r for r in range(rows)])


@pytest.mark.parametrize("params", PARAMS[1:4])
def test_sampled_decode_step_follows_the_target_distribution(target, params):
    cache, _, anchor = replicated(target, None, ROWS, 1)
    step = DecodeStep(target, cache, ROWS, sampling=True)
    load_seeded(step, params, ROWS)
    load_rows(step, [anchor] * ROWS, [len(PROMPT)] * ROWS)
    tokens, logits = step.step()
    p = token_distribution(logits[0], params)
    counts = torch.bincount(tokens, minlength=p.shape[0]).float()
    assert chi_square_p_value(counts, p) > 1e-3
    assert chi_square_p_value(counts, token_distribution(logits[0], SamplingParams(temperature=3.0))) < 1e-6


@pytest.mark.parametrize("params,source", [(PARAMS[1], "lookup"), (PARAMS[2], "lookup"), (PARAMS[3], "lookup"), (PARAMS[1], "drafter")])
def test_sampled_speculative_step_follows_the_target_distribution(target, params, source):
    """The first two tokens a step emits follow p0 and p1 (the second: among rows that accepted the first draft),
    whether the drafts are a likely and an unlikely token written as lookup drafts, or the drafter's own (random
    weights: its drafts are rarely accepted, so only the first token is tested there)."""
    drafter = make_drafter(target, block_size=3)
    cache, draft_cache, anchor = replicated(target, drafter, ROWS, 3)
    step = SpeculativeStep(target, drafter, cache, draft_cache, ROWS, sampling=True)
    load_seeded(step, params, ROWS)
    load_rows(step, [anchor] * ROWS, [len(PROMPT)] * ROWS)
    if source == "lookup":
        greedy = sum(generate_plain(target, PROMPT, SamplingParams(max_tokens=3, ignore_eos=True)), [])
        drafts = [greedy[1], (greedy[2] + 1) % target.config.vocab_size]
        step.load_lookups([drafts] * ROWS)
    else:
        with torch.no_grad():
            drafts = step.draft()[0].tolist()
    result, logits = step.step()
    torch.testing.assert_close(logits[-1], logits[0])            # every row verified the same block
    p = token_distribution(logits[0], params)
    emitted = committed_tokens(result)
    assert all(e[:-1] == drafts[:len(e) - 1] for e in emitted)
    first = torch.bincount(torch.tensor([e[0] for e in emitted]), minlength=p.shape[-1]).float()
    assert chi_square_p_value(first, p[0]) > 1e-3
    assert chi_square_p_value(first, p[1]) < 1e-6                 # the test tells distributions apart
    if source == "lookup":
        second = torch.tensor([e[1] for e in emitted if len(e) > 1], dtype=torch.long)
        assert len(second) > 300                                  # enough rows accepted the first draft
        assert chi_square_p_value(torch.bincount(second, minlength=p.shape[-1]).float(), p[1]) > 1e-3


def test_greedy_rows_of_a_sampled_step_decode_greedily(target):
    """Rows with temperature 0 beside sampled rows: exactly what the greedy step commits."""
    drafter = make_drafter(target, block_size=4)
    cache, draft_cache, anchor = replicated(target, drafter, 4, 4)
    steps = []
    for sampling in (False, True):
        step = SpeculativeStep(target, drafter, copy.deepcopy(cache), copy.deepcopy(draft_cache), 4,
                               sampling=sampling)
        if sampling:
            step.sampling.load([SamplingParams(), SamplingParams(temperature=1.0), SamplingParams()], [0, 1, 2])
        load_rows(step, [anchor] * 4, [len(PROMPT)] * 4)
        steps.append(step)
    for _ in range(3):
        greedy, sampled = (committed_tokens(s.step()[0]) for s in steps)
        assert sampled[0] == greedy[0] and sampled[2] == greedy[2] and sampled[3] == greedy[3]
        for s, rows in zip(steps, (greedy, sampled)):
            load_rows(s, [r[-1] for r in rows], s.lengths.tolist())


# --------------------------------------------------------------------------------- the single-sequence loop


def test_static_sampling_is_reproducible_by_seed(target):
    drafter = make_drafter(target)
    runs = {}
    for seed in (1, 1, 2):
        for spec in (None, drafter):
            params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=seed, ignore_eos=True)
            runs.setdefault((seed, spec is None), []).append(sum(generate_static(target, PROMPT, params,
                                                                                drafter=spec), []))
    for key, outputs in runs.items():
        assert all(len(out) == 24 for out in outputs)
        assert key[0] != 1 or outputs[0] == outputs[1]          # the same seed, the same text
    assert runs[(1, True)][0] != runs[(2, True)][0] and runs[(1, False)][0] != runs[(2, False)][0]


def test_static_lookup_drafts_keep_greedy_output(target):
    """A prompt that repeats itself: lookup drafts are verified, and the output is still plain greedy's."""
    prompt = PROMPT * 4
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    stats = GenerationStats()
    got = sum(generate_static(target, prompt, params, drafter=make_drafter(target), stats=stats, lookup=True), [])
    assert got == sum(generate_plain(target, prompt, params), [])
    assert stats.lookup_steps > 0
