"""Lookup drafts (prompt lookup): the index proposes what followed the longest recurring suffix, and decoding with
them stays lossless: greedy output equals plain decoding, alone or in a batch beside drafter rows, and sampled
output follows the target distribution (checked statistically)."""

import itertools

import pytest
import torch

from tests.engine.test_speculative import chi_square_p_value, decode_batch, make_drafter, plain_tokens
from tests.helpers import hf_model, ours_from_hf
from ultraspeed.engine import speculative
from ultraspeed.engine.generate import GenerationStats
from ultraspeed.engine.lookup_draft import NgramIndex, lookup_confidence
from ultraspeed.engine.sampler import SamplingParams, token_distribution
from ultraspeed.engine.verify_length import StepCost

pytest.importorskip("transformers")


def test_the_longest_recurring_suffix_proposes_what_followed_its_latest_occurrence():
    index = NgramIndex.of([1, 2, 3, 9, 5, 2, 3, 7, 8, 4, 1, 2, 3])
    # (2, 3) recurs twice, followed by 9 then by 7; (1, 2, 3) recurs once, followed by 9: the longer match wins
    assert index.propose(4) == ([9, 5, 2, 3], 3)
    index.extend([7])                          # (1, 2, 3, 7) is new; (2, 3, 7) was followed by 8
    assert index.propose(3) == ([8, 4, 1], 3)
    assert NgramIndex.of([1, 2, 3, 4]).propose(4) == ([], 0)    # nothing recurs
    assert NgramIndex.of([5, 5]).propose(4) == ([], 0)          # its own suffix is not a match
    assert NgramIndex.of([5, 5, 5]).propose(4) == ([5], 2)      # stops where the sequence ends


def test_extending_token_by_token_builds_the_same_index():
    tokens = [int(t) for t in torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(0))]
    grown = NgramIndex()
    for t in tokens:
        grown.extend([t])
    assert grown.after == NgramIndex.of(tokens).after and grown.propose(6) == NgramIndex.of(tokens).propose(6)


def test_longer_matches_are_trusted_more_and_later_slots_keep_the_last_rate():
    two, four = lookup_confidence(2, 8), lookup_confidence(7, 8)
    assert len(two) == 8 and two[0] < four[0] and two[-1] == two[-2]
    assert all(0 < c < 1 for c in two + four)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return ours_from_hf(hf_model("qwen3", seed=5), tmp_path_factory.mktemp("qwen3"))


# The prompt repeats itself and tiny random models soon repeat too, so lookups fire often.
PROMPT = [3, 17, 42, 9, 3, 17, 42, 9, 3, 17]


@pytest.mark.parametrize("step_cost, min_accepted", [(None, 0.0), (StepCost(draft=1.0, fixed=1.0, per_token=0.2), 0.0),
                                                     (None, 100.0)])
def test_greedy_with_lookup_drafts_equals_plain_decoding(target, step_cost, min_accepted, monkeypatch):
    """Also when the drafter is given up after the probe steps (min_accepted 100): lookup drafts go on then, as
    they need no drafter forward."""
    drafts_run = []
    real_draft = speculative.draft_block
    monkeypatch.setattr(speculative, "draft_block", lambda *a: drafts_run.append(1) or real_draft(*a))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    stats = GenerationStats()
    got = sum(speculative.generate_speculative(target, make_drafter(target, 6), PROMPT, params, stats=stats,
                                               step_cost=step_cost, lookup=True, min_accepted=min_accepted,
                                               probe_steps=2), [])
    assert got == plain_tokens(target, PROMPT, params)
    assert stats.lookup_steps > 0 and max(stats.accepted_lengths) > 1     # lookup drafts were made and accepted
    if min_accepted:
        assert stats.plain_after == 2 and len(drafts_run) <= 2
        assert max(stats.accepted_lengths[2:]) > 1                       # and accepted after the switch
    else:
        assert len(drafts_run) == len(stats.accepted_lengths) - stats.lookup_steps   # drafter only without one


class NoMatches(NgramIndex):
    """A row that never finds its suffix again (tiny random models repeat themselves too soon for a real one)."""

    def propose(self, length):
        return [], 0


def test_a_batch_mixing_lookup_and_drafter_rows_equals_plain_decoding(target):
    prompts = [PROMPT, [100, 5, 6, 7, 8, 9, 10, 11, 12], [55, 66]]
    params = SamplingParams(max_tokens=25, ignore_eos=True)
    outputs, _, looked = decode_batch(target, make_drafter(target, block_size=5), prompts, params,
                                      index_of=lambda row, tokens: (NoMatches if row == 2 else NgramIndex).of(tokens))
    for prompt, out in zip(prompts, outputs):
        assert out[:25] == plain_tokens(target, prompt, params)
    assert any(row[0] for row in looked) and not any(row[2] for row in looked)   # mixed steps happened


def test_lookup_drafts_of_a_batch_are_padded_with_chance_zero():
    drafts, chances, looked_up = speculative.lookup_drafts(
        [NgramIndex.of(PROMPT), None, NoMatches.of(PROMPT), NgramIndex.of([1, 2, 3, 1, 2])], 4, torch.device("cpu"))
    assert looked_up == [True, False, False, True]
    assert drafts.tolist() == [[42, 9, 3, 17], [0] * 4, [0] * 4, [3, 1, 2, 0]]
    torch.testing.assert_close(chances[0], torch.tensor(lookup_confidence(4, 4)))   # 42, 9, 3, 17 recurs
    assert chances[1:3].eq(0).all() and chances[3, 3] == 0 and chances[3, :3].gt(0).all()
    drafts, chances, looked_up = speculative.lookup_drafts([None, NoMatches()], 4, torch.device("cpu"))
    assert drafts.shape == chances.shape == (2, 0) and looked_up == [False, False]


@pytest.mark.parametrize("gave_up", [False, True])
def test_sampling_with_lookup_drafts_follows_the_target_distribution(target, gave_up, monkeypatch):
    """Three sampled tokens (top-2 at each step, so 8 possible continuations) after a prompt whose suffix recurs:
    their frequencies over many seeds match the target's own probabilities of each continuation; also when the
    drafter is given up after the first step, so that the later steps verify lookup drafts only."""
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=2, ignore_eos=True)
    prompt = [3, 17, 42, 3, 17]
    exact = {}
    with torch.inference_mode():
        for seq in itertools.product(*[range(2)] * 3):
            ids, prob = list(prompt), 1.0
            for choice in seq:
                hidden, _ = target(torch.tensor([ids]), target.new_cache(1, 16))
                p = token_distribution(target.logits(hidden[:, -1]), params)[0]
                top = torch.topk(p, 2)
                prob *= float(top.values[choice])
                ids.append(int(top.indices[choice]))
            exact[tuple(ids[len(prompt):])] = prob
    counts = dict.fromkeys(exact, 0)
    drafter, lookup_steps = make_drafter(target, 4), 0
    plain_lookups, real_step = {"n": 0}, speculative.lookup_step

    def counted_step(*args):
        out = real_step(*args)
        plain_lookups["n"] += out[2][0]
        return out

    monkeypatch.setattr(speculative, "lookup_step", counted_step)
    for seed in range(600):
        stats = GenerationStats()
        out = sum(speculative.generate_speculative(target, drafter, prompt, SamplingParams(
            max_tokens=3, temperature=1.0, top_k=2, ignore_eos=True, seed=seed), stats=stats, lookup=True,
            min_accepted=100.0 if gave_up else 0.0, probe_steps=1), [])
        counts[tuple(out)] += 1
        lookup_steps += stats.lookup_steps
    assert lookup_steps > 100 and (plain_lookups["n"] > 50) == gave_up
    keys = list(exact)
    observed = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
    expected = torch.tensor([exact[k] for k in keys], dtype=torch.float64)
    assert chi_square_p_value(observed, expected) > 1e-3
    # And the test has power: the same counts do not fit a uniform choice among the 8 continuations.
    assert chi_square_p_value(observed, torch.full_like(expected, 1 / 8)) < 1e-6
