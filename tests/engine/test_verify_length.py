"""The verify-length rule: expected tokens from the drafter's confidences, and the length with the best rate."""

import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.engine import verify_length
from ultraspeed.engine.verify_length import StepCost, choose_verify_length, expected_tokens, measure_step_cost
from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random, with_block_size


def test_expected_tokens_counts_the_bonus_and_each_surviving_prefix():
    e = expected_tokens(torch.tensor([[0.5, 0.5, 1.0], [1.0, 0.0, 1.0]]))
    torch.testing.assert_close(e, torch.tensor([[1.0, 1.5, 1.75, 2.0], [1.0, 2.0, 2.0, 2.0]]))


def test_nothing_drafted_means_nothing_to_verify():
    """A step where no row has a draft (a lookup step that found none) still gets a length: zero."""
    torch.testing.assert_close(expected_tokens(torch.zeros(3, 0)), torch.ones(3, 1))
    assert choose_verify_length(torch.zeros(3, 0), StepCost(draft=0.0, fixed=1.0, per_token=0.1)) == 0


def test_flat_verify_cost_verifies_the_whole_block():
    """A GPU-like cost (extra positions are free): every draft is worth verifying, however unsure."""
    assert choose_verify_length(torch.full((2, 7), 0.05), StepCost(draft=0.1, fixed=1.0, per_token=0.0)) == 7


def test_steep_verify_cost_stops_where_the_drafter_turns_unsure():
    cost = StepCost(draft=0.3, fixed=1.0, per_token=0.15)            # ~the default model on our CPU
    sure_then_unsure = torch.tensor([[0.95, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1]])
    assert choose_verify_length(sure_then_unsure, cost) == 3
    assert choose_verify_length(torch.full((1, 7), 0.02), cost) == 0
    assert choose_verify_length(torch.full((1, 7), 0.99), cost) == 7


def test_rows_share_one_length_chosen_for_their_total():
    cost = StepCost(draft=0.0, fixed=1.0, per_token=0.1)
    sure, unsure = torch.full((1, 5), 0.99), torch.full((1, 5), 0.01)
    assert choose_verify_length(sure, cost) == 5 and choose_verify_length(unsure, cost) == 0
    assert 0 < choose_verify_length(torch.cat([sure, unsure]), cost) <= 5


def test_break_even_is_the_step_cost_in_plain_steps():
    cost = StepCost(draft=0.25, fixed=0.9, per_token=0.1)            # a plain step costs 1.0
    assert cost.break_even([0]) == pytest.approx(1.25)               # the drafter + a plain step
    assert cost.break_even([0, 4]) == pytest.approx((1.25 + 1.65) / 2)
    assert cost.break_even([]) == 1.0


def test_measure_step_cost_times_the_model(tmp_path):
    target = ours_from_hf(hf_model("qwen3", seed=5), tmp_path)
    drafter = DFlashDrafter(DFlashConfig.for_target(target.config, num_layers=1, num_features=2, block_size=4))
    init_random(drafter, 0)
    cost = measure_step_cost(target, drafter.requires_grad_(False), repeats=1)
    assert cost.draft > 0 and cost.fixed >= 0 and cost.per_token >= 0 and cost.fixed + cost.per_token > 0


@pytest.mark.parametrize("bad", [StepCost(0.0, 0.0, 0.0)])
def test_a_zero_cost_model_still_chooses_a_length(bad):
    """Degenerate timings (a clock too coarse to see a tiny model) must not divide by zero."""
    assert 0 <= choose_verify_length(torch.full((1, 3), 0.5), bad) <= 3


def test_step_costs_are_timed_in_interleaved_rounds(monkeypatch):
    # A fake clock: each call takes 1 s, except that round 2 (a slow spell of the machine) takes 10 s for all.
    calls, clock = [], [0.0]
    monkeypatch.setattr(verify_length.time, "perf_counter", lambda: clock[0])

    def fn(name):
        def run():
            calls.append(name)
            clock[0] += 10.0 if len(calls) in (7, 8, 9) else 1.0 + 0.1 * "abc".index(name)
        return run

    medians = verify_length._timed_rounds([fn("a"), fn("b"), fn("c")], torch.device("cpu"), repeats=3)
    assert calls == ["a", "b", "c"] * 4                     # one warm-up round, then 3 rounds of all three
    assert medians == pytest.approx([1.0, 1.1, 1.2])        # the slow round shifts no median


def test_a_cpu_drafts_short_blocks_unless_told_otherwise():
    from ultraspeed.engine.verify_length import CPU_BLOCK_SIZE, serving_block_size
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert serving_block_size(16, 0, cpu) == CPU_BLOCK_SIZE == 8
    assert serving_block_size(4, 0, cpu) == 4                   # never longer than the drafter was trained for
    assert serving_block_size(16, 0, gpu) == 16                 # verification is ~free there: the whole block
    assert serving_block_size(16, 12, cpu) == 12 and serving_block_size(16, 4, gpu) == 4
    drafter = DFlashDrafter(DFlashConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                                         intermediate_size=96, vocab_size=128, target_layer_ids=(0, 1),
                                         block_size=16))
    assert with_block_size(drafter, 12).config.block_size == 12
    for bad in (100_000, 17, 1):                                # 100k used to allocate a 100k x 100k mask
        with pytest.raises(UltraSpeedError, match="drafts blocks of 2 to 16"):
            with_block_size(drafter, bad)
