"""Speculative decoding is lossless: greedy output equals plain greedy decoding token for token (whatever the
drafter proposes), and sampling draws from exactly the target distribution (checked statistically)."""

import math

import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.engine import speculative
from ultraspeed.engine.generate import GenerationStats, generate_plain
from ultraspeed.engine.sampler import SamplingParams, token_distribution
from ultraspeed.engine.verify_length import StepCost
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return ours_from_hf(hf_model("qwen3", seed=5), tmp_path_factory.mktemp("qwen3"))


def make_drafter(target, block_size=6, seed=0):
    d = DFlashDrafter(DFlashConfig.for_target(target.config, num_layers=1, num_features=2, block_size=block_size))
    init_random(d, seed)
    return d.requires_grad_(False)


def plain_tokens(target, prompt, params):
    return sum(generate_plain(target, prompt, params), [])


@pytest.mark.parametrize("block_size", [2, 6])
def test_greedy_random_drafter_identical(target, block_size):
    prompt = [3, 17, 42, 9, 100, 5]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    stats = GenerationStats()
    got = sum(speculative.generate_speculative(target, make_drafter(target, block_size), prompt, params,
                                               stats=stats), [])
    assert got == plain_tokens(target, prompt, params)
    assert stats.new_tokens == 30 and stats.finish_reason == "length"


def test_greedy_with_good_and_bad_drafts_identical(target, monkeypatch):
    """A drafter that is right most of the time: multi-token acceptance, partial acceptance and full blocks."""
    prompt = [7, 8, 9, 10]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    truth = plain_tokens(target, prompt, SamplingParams(max_tokens=80, ignore_eos=True))
    calls = {"n": 0}

    def oracle_draft(drafter, tgt, draft_cache, anchors):
        # Draft the true continuation after the anchor, corrupting one slot every third call.
        pos = int(draft_cache.lengths[0]) - len(prompt)          # index of the anchor in `truth`
        B = drafter.config.block_size
        guess = torch.tensor(truth[pos + 1: pos + B] + [0] * B)[:B - 1].view(1, -1)
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            guess[0, calls["n"] % (B - 1)] = (guess[0, calls["n"] % (B - 1)] + 1) % 128
        return guess, torch.ones(guess.shape)

    monkeypatch.setattr(speculative, "draft_block", oracle_draft)
    stats = GenerationStats()
    got = sum(speculative.generate_speculative(target, make_drafter(target, 6), prompt, params, stats=stats), [])
    assert got == truth[:40]
    assert stats.mean_accepted > 3.0            # the oracle really was accepted several tokens at a time
    assert max(stats.accepted_lengths) == 6     # and whole blocks went through


def test_stop_token_ends_generation(target):
    prompt = [3, 17, 42]
    params = SamplingParams(max_tokens=30, ignore_eos=False)
    truth = plain_tokens(target, prompt, SamplingParams(max_tokens=30, ignore_eos=True))
    stop = truth[4]
    first = truth.index(stop)
    got = sum(speculative.generate_speculative(target, make_drafter(target), prompt, params, stop_ids=(stop,)), [])
    assert got == truth[:first + 1]


def test_accept_greedy_prefix_rule():
    V = 10
    targets = torch.tensor([[4, 5, 6, 7], [1, 2, 3, 4]])
    logits = torch.nn.functional.one_hot(targets, V).float()
    drafts = torch.tensor([[4, 5, 9], [0, 2, 3]])
    accepted, bonus = speculative.accept_greedy(drafts, logits)
    assert accepted.tolist() == [2, 0]
    assert bonus.tolist() == [6, 1]


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; p-value via the Wilson-Hilferty normal approximation."""
    n = counts.sum()
    keep = probs > 0
    expected = probs[keep] * n
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9),
                                    SamplingParams(temperature=1.3, top_k=4)])
def test_rejection_sampling_keeps_target_distribution(params):
    """First two emitted tokens of a block follow p0 and p1 exactly, whatever the (point-mass) drafts are."""
    torch.manual_seed(0)
    V, N = 6, 30000
    logits = torch.randn(1, 3, V) * 1.5
    p = token_distribution(logits, params)[0]
    drafts = torch.tensor([[int(p[0].argmax()), int(p[1].argmin())]])   # a likely and an unlikely draft
    g = torch.Generator().manual_seed(1)
    first = torch.zeros(V)
    second_after_d1 = torch.zeros(V)
    accepted, bonuses = speculative.accept_sampling(drafts.expand(N, -1), logits.expand(N, -1, -1), params, g)
    for a, bonus in zip(accepted.tolist(), bonuses.tolist()):
        emitted = drafts[0, :a].tolist() + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == int(drafts[0, 0]) and len(emitted) > 1:
            second_after_d1[emitted[1]] += 1
    assert chi_square_p_value(first, p[0]) > 1e-3
    assert chi_square_p_value(second_after_d1, p[1]) > 1e-3
    # And the test has power: the same counts do not fit a different distribution.
    assert chi_square_p_value(first, p[1]) < 1e-6


def test_rejection_sampling_with_nothing_drafted_samples_the_target():
    """A step that verifies no drafts (the drafter was too unsure) still draws its one token from p."""
    torch.manual_seed(0)
    V, N = 6, 20000
    params = SamplingParams(temperature=0.8)
    logits = torch.randn(1, 1, V) * 1.5
    p = token_distribution(logits, params)[0, 0]
    accepted, bonuses = speculative.accept_sampling(torch.zeros(N, 0, dtype=torch.long), logits.expand(N, -1, -1),
                                                    params, torch.Generator().manual_seed(2))
    assert accepted.eq(0).all()
    assert chi_square_p_value(torch.bincount(bonuses, minlength=V).float(), p) > 1e-3


# A cost model under which verifying is expensive enough that confident and unsure drafts get different lengths.
STEEP = StepCost(draft=0.0, fixed=1.0, per_token=0.3)


@pytest.mark.parametrize("step_cost", [None, STEEP], ids=["whole-blocks", "adaptive"])
def test_batched_rows_with_different_lengths_identical(target, step_cost, monkeypatch):
    """A running batch of three sequences (different prompt lengths, so different acceptance and positions)
    stepped together reproduces each sequence's plain greedy output, whether whole blocks or only their
    confident prefixes are verified (confidences randomised so that every verify length occurs)."""
    g = torch.Generator().manual_seed(0)
    real_draft = speculative.draft_block
    monkeypatch.setattr(speculative, "draft_block",
                        lambda *a: (real_draft(*a)[0], torch.rand(real_draft(*a)[0].shape, generator=g) ** 0.3))
    drafter = make_drafter(target, block_size=5)
    prompts = [[3, 17, 42, 9], [100, 5, 6, 7, 8, 9, 10, 11, 12], [55, 66]]
    params = SamplingParams(max_tokens=25, ignore_eos=True)
    outputs, verified, _ = decode_batch(target, drafter, prompts, params, step_cost)
    for prompt, out in zip(prompts, outputs):
        assert out[:25] == plain_tokens(target, prompt, params)
    assert set(verified) == {4} if step_cost is None else len(set(verified)) >= 3


def decode_batch(target, drafter, prompts, params, step_cost=None, index_of=None):
    """Greedy rows stepped together by speculative_step until each has params.max_tokens tokens. index_of(row,
    tokens) builds a row's lookup index (None: no lookup drafts). -> outputs per row, drafts verified per step,
    which rows looked up per step."""
    n = len(prompts)
    cache, draft_cache = target.new_cache(n, 128), speculative.new_draft_cache(drafter, n, 128)
    anchors, pending, outputs, verified, looked = [], [], [], [], []
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            hidden, captured = target(torch.tensor([prompt]), cache, drafter.config.target_layer_ids, first_row=row)
            anchors.append(int(target.logits(hidden[:, -1]).argmax()))
            pending.append(speculative.features_of(captured))
            outputs.append([anchors[-1]])
        indexes = [index_of(row, p + o) for row, (p, o) in enumerate(zip(prompts, outputs))] if index_of else None
        while min(len(o) for o in outputs) < params.max_tokens:
            committed, pending, n_verified, looked_up = speculative.speculative_step(
                target, drafter, cache, draft_cache, anchors, pending, [params] * n, [None] * n, step_cost, indexes)
            verified.append(n_verified)
            looked.append(looked_up)
            for row, toks in enumerate(committed):
                outputs[row].extend(toks)
                anchors[row] = toks[-1]
                if indexes:
                    indexes[row].extend(toks)
    return outputs, verified, looked


def test_draft_vocabulary_subset_stays_lossless(target):
    from ultraspeed.train.drafter import draft_labels
    d = DFlashDrafter(DFlashConfig.for_target(target.config, num_layers=1, num_features=2, block_size=4,
                                              draft_vocab_size=16))
    init_random(d, 3)
    d.draft_vocab = torch.arange(0, 128, 8)                  # every 8th token id
    d.requires_grad_(False)
    assert draft_labels(d, torch.tensor([0, 8, 9, 120])).tolist() == [0, 1, -1, 15]
    prompt = [1, 2, 3, 4, 5]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    got = sum(speculative.generate_speculative(target, d, prompt, params), [])
    assert got == plain_tokens(target, prompt, params)


def test_fallback_to_plain_decoding_is_exact(target, monkeypatch):
    """A drafter that is never right triggers the switch to plain decoding; the output does not change."""
    prompt = [9, 9, 1, 2]
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    stats = GenerationStats()
    calls = []
    real_draft = speculative.draft_block
    monkeypatch.setattr(speculative, "draft_block", lambda *a: calls.append(1) or real_draft(*a))
    got = sum(speculative.generate_speculative(target, make_drafter(target, 6), prompt, params, stats=stats,
                                               min_accepted=100.0, probe_steps=3), [])
    assert got == plain_tokens(target, prompt, params)
    assert len(calls) == 3                                    # no drafting after the probe steps
    assert stats.accepted_lengths[3:] == [1] * (len(stats.accepted_lengths) - 3)


@pytest.mark.parametrize("step_cost, gives_up", [(StepCost(draft=5.0, fixed=1.0, per_token=0.1), True),
                                                 (None, False)])
def test_automatic_fallback_uses_the_break_even_of_the_step_costs(target, step_cost, gives_up):
    """min_accepted=None: give up where the drafter commits less than its steps cost in plain steps (a drafter
    five plain steps dear never pays); without measured costs there is no break-even, so it never gives up."""
    prompt = [9, 9, 1, 2]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    stats = GenerationStats()
    got = sum(speculative.generate_speculative(target, make_drafter(target, 6), prompt, params, stats=stats,
                                               min_accepted=None, probe_steps=3, step_cost=step_cost), [])
    assert got == plain_tokens(target, prompt, params)
    assert (stats.plain_after == 3) == gives_up
