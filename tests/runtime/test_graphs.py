"""Capture/replay wrapper (ultraspeed/runtime/graphs.py): on the CPU the same objects run the step eagerly; the
bucket bookkeeping and row padding are tested here; graph capture itself only where CUDA exists."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.runtime.graphs import CapturedStep, StepGraphs, graphs_available, load_rows, pick_bucket
from ultraspeed.runtime.loop import decode_greedy, prefill_rows
from ultraspeed.runtime.static_step import DecodeStep

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


class CountingStep:
    """A stand-in static step: adds 1 to its lengths and returns them."""

    def __init__(self, batch: int, device: str = "cpu") -> None:
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.calls = 0

    def state(self):
        return [self.tokens, self.lengths]

    def step(self):
        self.calls += 1
        self.lengths.add_(1)
        return (self.lengths * 2,)


def test_pick_bucket():
    assert pick_bucket(1, [1, 4, 16]) == 1
    assert pick_bucket(3, [16, 1, 4]) == 4
    assert pick_bucket(16, [1, 4, 16]) == 16
    for bad in (0, 17):
        with pytest.raises(ValueError, match="no bucket"):
            pick_bucket(bad, [1, 4, 16])


def test_load_rows_pads_and_checks():
    step = CountingStep(4)
    load_rows(step, [5, 6], [10, 3])
    assert step.tokens.view(-1).tolist() == [5, 6, 0, 0]
    assert step.lengths.tolist() == [10, 3, 0, 0]
    with pytest.raises(ValueError):
        load_rows(step, [1] * 5, [1] * 5)
    with pytest.raises(ValueError):
        load_rows(step, [1, 2], [1])


def test_captured_step_is_eager_on_cpu():
    step = CountingStep(2)
    captured = CapturedStep(step)
    assert not captured.enabled and captured.graph is None and step.calls == 0   # no warm-up without a graph
    assert captured()[0].tolist() == [2, 2]
    assert captured()[0].tolist() == [4, 4]
    assert not graphs_available("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        CapturedStep(CountingStep(1), enabled=True)


def test_step_graphs_builds_one_step_per_bucket():
    made = []

    def make(batch, block):
        made.append((batch, block))
        return CountingStep(batch)

    graphs = StepGraphs(make, [1, 4, 8])
    a = graphs.get(3, 1)
    assert graphs.get(4, 1) is a and graphs.get(2, 1) is a
    assert graphs.get(1, 1) is not a
    graphs.get(5, 16)
    assert made == [(4, 1), (1, 1), (8, 16)]
    assert a.step.lengths.shape == (4,)


def test_decode_step_through_wrapper_equals_plain_calls(tmp_path):
    model = ours_from_hf(hf_model("qwen3", seed=2), tmp_path)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    eager = decode_greedy(model, prompts, 6, graphs=False)
    assert decode_greedy(model, prompts, 6) == eager      # graphs=None: the CPU picks eager, same result


@requires_cuda
def test_cuda_graph_replay_equals_eager(tmp_path):
    """On a CUDA machine: capture a decode step, replay it, compare with eager steps from the same state."""
    model = ours_from_hf(hf_model("qwen3", seed=2), tmp_path).to("cuda")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cache = model.new_cache(2, 32)
    logits, _ = prefill_rows(model, cache, prompts)
    first, lengths = logits.argmax(-1).tolist(), cache.lengths[:2].tolist()
    step = DecodeStep(model, cache, 2)
    load_rows(step, first, lengths)
    eager = [step.step()[1].clone() for _ in range(3)]
    load_rows(step, first, lengths)
    captured = CapturedStep(step)
    assert captured.graph is not None
    assert step.lengths.tolist() == lengths          # warm-up runs were undone
    for ref in eager:
        torch.testing.assert_close(captured()[1], ref, atol=0, rtol=0)


@requires_cuda
def test_cuda_graph_speculative_greedy_equals_plain(tmp_path):
    """On a CUDA machine: greedy speculative decoding through captured steps gives plain greedy's tokens."""
    from ultraspeed.engine.batch_generate import generate_batch
    from ultraspeed.engine.sampler import SamplingParams
    from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random
    from ultraspeed.runtime.loop import speculative_greedy
    model = ours_from_hf(hf_model("qwen3", seed=2), tmp_path).to("cuda")
    drafter = DFlashDrafter(DFlashConfig.for_target(model.config, num_layers=1, num_features=2, block_size=4))
    init_random(drafter, 0)
    drafter = drafter.requires_grad_(False).to("cuda")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    want = generate_batch(model, prompts, SamplingParams(max_tokens=12, ignore_eos=True), max_batch=2)
    assert speculative_greedy(model, drafter, prompts, 12, graphs=True) == want


@requires_cuda
def test_cuda_graph_sampled_speculative_step_equals_eager(tmp_path):
    """On a CUDA machine: sampling inside a captured speculative step draws what the eager step draws (its
    uniforms are hashed from the seeds and positions, not taken from a generator), replay after replay, and the
    hashed uniforms are the CPU's bit for bit."""
    import copy

    from ultraspeed.engine import speculative
    from ultraspeed.engine.sampler import SamplingParams
    from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random
    from ultraspeed.runtime.device_sampling import DRAW, counter_uniform
    from ultraspeed.runtime.static_step import SpeculativeStep
    seeds, positions = torch.tensor([1, 2**40 + 3]), torch.arange(64).view(1, -1).expand(2, -1)
    assert torch.equal(counter_uniform(seeds.cuda(), positions.cuda(), DRAW).cpu(),
                       counter_uniform(seeds, positions, DRAW))
    model = ours_from_hf(hf_model("qwen3", seed=2), tmp_path).to("cuda")
    drafter = DFlashDrafter(DFlashConfig.for_target(model.config, num_layers=1, num_features=2, block_size=4))
    init_random(drafter, 0)
    drafter = drafter.requires_grad_(False).to("cuda")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cache = model.new_cache(2, 64)
    draft_cache = speculative.new_draft_cache(drafter, 2, 64)
    logits, features = prefill_rows(model, cache, prompts, drafter.config.target_layer_ids)
    for row, captured in enumerate(features):
        speculative.append_context(drafter, draft_cache, row, speculative.features_of(captured))
    first, lengths = logits.argmax(-1).tolist(), cache.lengths[:2].tolist()
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams()]
    results = []
    for graph in (False, True):
        step = SpeculativeStep(model, drafter, copy.deepcopy(cache), copy.deepcopy(draft_cache), 2, sampling=True)
        step.sampling.load(params, [5, 6])
        load_rows(step, first, lengths)
        run = CapturedStep(step, enabled=graph)
        assert (run.graph is not None) == graph
        results.append([run()[0].clone().cpu() for _ in range(5)])
    for eager, replayed in zip(*results):
        assert torch.equal(eager, replayed)


@requires_cuda
def test_cuda_graph_serving_engine_equals_plain_greedy(tmp_path):
    """On a CUDA machine: the serving engine with runtime="static" captures a step per batch bucket on its own
    thread and serves both lanes with exactly plain greedy's tokens."""
    from tests.helpers import run_requests
    from ultraspeed.engine.generate import generate_plain
    from ultraspeed.engine.sampler import SamplingParams
    from ultraspeed.engine.scheduler import Engine, EngineConfig, EngineRequest, GroupConfig
    from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random
    model = ours_from_hf(hf_model("qwen3", seed=2), tmp_path).to("cuda")
    drafter = DFlashDrafter(DFlashConfig.for_target(model.config, num_layers=1, num_features=2, block_size=4))
    init_random(drafter, 0)
    drafter = drafter.requires_grad_(False).to("cuda")
    config = EngineConfig(groups=(GroupConfig("standard", 2), GroupConfig("ultraspeed", 2, speculative=True)),
                          max_len=64, runtime="static")
    engine = Engine(model, config, drafter).start()
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    try:
        got = run_requests(engine, [EngineRequest(p, params, None, group=("standard", "ultraspeed")[i % 2])
                                    for i, p in enumerate(prompts)], timeout=120)
    finally:
        engine.stop()
    assert [c.tokens for c in got] == [sum(generate_plain(model, p, params), []) for p in prompts]
    assert all(step.graph is not None for step in engine._spec.runner.graphs.steps.values())


@requires_cuda
def test_cuda_graph_lookup_steps_without_drafter_equal_plain_greedy(tmp_path):
    """On a CUDA machine: generate_static on a repetitive prompt drafts by lookup, replays the second captured
    graph (the step without the drafter's forward, captured mid-generation on first use) and still gives plain
    greedy's tokens, as the eager run does."""
    from ultraspeed.engine.generate import GenerationStats, generate_plain
    from ultraspeed.engine.sampler import SamplingParams
    from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random
    from ultraspeed.runtime.loop import generate_static
    model = ours_from_hf(hf_model("qwen3", seed=2), tmp_path).to("cuda")
    drafter = DFlashDrafter(DFlashConfig.for_target(model.config, num_layers=1, num_features=2, block_size=4))
    init_random(drafter, 0)
    drafter = drafter.requires_grad_(False).to("cuda")
    prompt = [3, 17, 42, 9, 100, 5] * 4
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    want = sum(generate_plain(model, prompt, params), [])
    for graphs in (False, True):
        stats = GenerationStats()
        got = sum(generate_static(model, prompt, params, drafter=drafter, stats=stats, graphs=graphs,
                                  lookup=True), [])
        assert got == want and stats.lookup_steps > 0
