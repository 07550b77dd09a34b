"""The continuous-batching engine: batched plain and batched speculative decoding give exactly the tokens of
single-sequence greedy decoding, requests join and leave mid-flight, cancellation frees the slot, the queue is
bounded, and every request ends with exactly one final update."""

from __future__ import annotations

import threading
import time

import pytest

from tests.helpers import Collector, run_requests as run
from ultraspeed.engine.generate import generate_plain
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.engine.scheduler import Engine, EngineConfig, EngineRequest, GroupConfig, QueueFull

GROUPS = (GroupConfig("standard", 3), GroupConfig("ultraspeed", 2, speculative=True))


def prompts(n):
    return [[(7 * i + j) % 120 + 1 for j in range(3 + i % 5)] for i in range(n)]


@pytest.fixture
def engine(tiny):
    e = Engine(tiny.model, EngineConfig(groups=GROUPS, max_len=128, max_queue=16), tiny.drafter).start()
    yield e
    e.stop()


def test_batched_plain_and_speculative_match_single_sequence_greedy(tiny, engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ps = prompts(9)
    expected = [sum(generate_plain(tiny.model, p, params), []) for p in ps]
    requests = [EngineRequest(p, params, None, group=("standard", "ultraspeed")[i % 2]) for i, p in enumerate(ps)]
    got = run(engine, requests)
    for c, want in zip(got, expected):
        assert c.tokens == want and c.final.finish_reason == "length"
    spec = [c for c, r in zip(got, requests) if r.group == "ultraspeed"]
    assert all(u.accepted >= 1 for c in spec for u in c.updates[1:])
    assert engine.queue_depth() == 0 and all(v["running"] == 0 for v in engine.snapshot().values())


def test_lookup_drafts_in_the_batch_keep_every_request_exact(tiny):
    """With lookup drafts on, speculative rows of repetitive prompts draft from their own context: the tokens
    are still those of single-sequence greedy decoding, also for the third request, which joins mid-flight
    (the tier runs two at once) in a row the first one left."""
    engine = Engine(tiny.model, EngineConfig(groups=GROUPS, max_len=128, max_queue=16, lookup=True),
                    tiny.drafter).start()
    try:
        params = SamplingParams(max_tokens=20, ignore_eos=True)
        ps = [[5, 9, 13, 5, 9, 13, 5, 9], [40, 41, 42, 43, 40, 41], [77, 3, 77, 3, 77]]
        expected = [sum(generate_plain(tiny.model, p, params), []) for p in ps]
        got = run(engine, [EngineRequest(p, params, None, group="ultraspeed") for p in ps])
        assert [c.tokens for c in got] == expected
        assert sum(c.final.stats.lookup_steps for c in got) > 0
    finally:
        engine.stop()


def test_stop_token_and_sampled_seeds_are_reproducible(tiny, engine):
    p = prompts(1)[0]
    truth = sum(generate_plain(tiny.model, p, SamplingParams(max_tokens=20, ignore_eos=True)), [])
    stop = truth[5]
    c, = run(engine, [EngineRequest(p, SamplingParams(max_tokens=20), None, stop_ids=(stop,))])
    assert c.tokens == truth[:truth.index(stop) + 1] and c.final.finish_reason == "stop"
    sampled = SamplingParams(temperature=0.9, max_tokens=10, seed=11, ignore_eos=True)
    a = run(engine, [EngineRequest(p, sampled, None, group=g) for g in ("standard", "ultraspeed")])
    b = run(engine, [EngineRequest(p, sampled, None, group="standard")])
    assert a[0].tokens == b[0].tokens and len(a[1].tokens) == 10


@pytest.mark.parametrize("group", ["standard", "ultraspeed"])
def test_candidates_of_one_prompt_share_its_prefill(tiny, group):
    """Requests admitted together with the same prompt (the n candidates of a call) copy the first one's cache
    row instead of prefilling, and still produce exactly what each produces alone. A parent that retires at its
    first token cannot be copied (its row is gone), so the next candidate prefills again.

    Whole-block verification here: a sampled speculative row draws one uniform per verified draft, and adaptive
    verification picks one length for all rows of a step from timed costs, so the same seed alone and in a
    batch may consume its random stream differently (both exact in distribution, not token for token)."""
    engine = Engine(tiny.model, EngineConfig(groups=GROUPS, max_len=128, max_queue=16, adaptive_verify=False),
                    tiny.drafter).start()
    try:
        check_candidates_share_a_prefill(engine, group)
    finally:
        engine.stop()


def check_candidates_share_a_prefill(engine, group):
    p = prompts(1)[0]
    sampled = [SamplingParams(temperature=0.9, max_tokens=9, seed=s, ignore_eos=True) for s in (4, 5)]
    first = [SamplingParams(max_tokens=1, ignore_eos=True)] if group == "standard" else []   # 2 slots there
    params = first + sampled
    together = run(engine, [EngineRequest(p, q, None, group=group) for q in params])
    alone = [run(engine, [EngineRequest(p, q, None, group=group)])[0] for q in params]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert [c.final.stats.prefill_tokens for c in alone] == [len(p)] * len(params)
    assert [c.final.stats.prefill_tokens for c in together] == [len(p)] * len(first) + [len(p), 0]


@pytest.mark.parametrize("lookup", [False, True])
def test_requests_the_drafter_does_not_help_move_to_the_plain_lane(tiny, lookup):
    """With min_accepted above what the drafter commits, speculative requests switch to plain decoding after the
    probe steps, mid-batch, and still produce exactly the plain greedy tokens. With lookup drafts they go on
    verifying those in the plain lane (they need no drafter), beside a standard request decoding one token per
    step."""
    config = EngineConfig(groups=GROUPS, max_len=128, max_queue=16, min_accepted=100.0, probe_steps=3,
                          lookup=lookup)
    engine = Engine(tiny.model, config, tiny.drafter).start()
    try:
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        ps = [[5, 9, 13, 5, 9, 13, 5, 9], [77, 3, 77, 3, 77], [5, 9, 13, 5, 9, 13, 5, 9]]
        got = run(engine, [EngineRequest(p, params, None, group=g)
                           for p, g in zip(ps, ("ultraspeed", "ultraspeed", "standard"))])
    finally:
        engine.stop()
    for c, p in zip(got, ps):
        assert c.tokens == sum(generate_plain(tiny.model, p, params), [])
    stats = [c.final.stats for c in got]
    assert [s.plain_after for s in stats] == [3, 3, None]
    after_switch = {a for s in stats[:2] for a in s.accepted_lengths[3:]}
    # after the switch a step commits one token, or more where a lookup draft was accepted
    assert after_switch == {1} if not lookup else max(after_switch) > 1
    assert stats[2].lookup_steps == 0 and set(stats[2].accepted_lengths) == {1}     # standard: plain decoding
    assert not engine._spec.seqs and not engine._plain.seqs


def test_fork_copies_the_parent_prompt_rows(tiny):
    """White-box: a forked row holds exactly the parent's prompt K/V (the tiny random model's samples barely
    depend on context, so the token check above alone could miss a wrong row)."""
    from ultraspeed.engine.generate import GenerationStats
    from ultraspeed.engine.scheduler import _PlainLane, _Sequence, _SpeculativeLane
    p = prompts(3)[2]

    def seq():
        return _Sequence(EngineRequest(p, SamplingParams(max_tokens=4), None), None, 4, GenerationStats(),
                         frozenset())
    for lane in (_PlainLane(tiny.model, 3, 64, 512), _SpeculativeLane(tiny.model, tiny.drafter, 3, 64, 512)):
        lane.admit(seq())                      # row 0: another sequence, so the fork must copy from row 1
        parent, child = seq(), seq()
        lane.admit(parent)
        lane.fork(child, parent)
        assert lane.cache.lengths[:3].tolist() == [len(p)] * 3
        for k in lane.cache.keys + lane.cache.values:
            assert k[2, :, :len(p)].abs().sum() > 0 and k[2, :, :len(p)].equal(k[1, :, :len(p)])
        if isinstance(lane, _SpeculativeLane):
            assert child.pending is parent.pending and lane.draft_cache.lengths[2] == 0


def test_cancel_frees_the_slot_and_queue_is_bounded(tiny):
    engine = Engine(tiny.model, EngineConfig(groups=(GroupConfig("standard", 1),), max_len=256, max_queue=2)).start()
    try:
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        first, second = Collector(), Collector()
        started = threading.Event()

        def on_first(u):
            first(u)
            started.set()

        id1, = engine.submit([EngineRequest([1, 2, 3], long, on_first)])
        assert started.wait(30)
        engine.submit([EngineRequest([4, 5], long, second), EngineRequest([6], long, Collector())])
        with pytest.raises(QueueFull):     # two already waiting behind the one running
            engine.submit([EngineRequest([7], long, Collector())])
        engine.cancel(id1)
        assert first.done.wait(10) and first.final.finish_reason == "cancelled"
        assert len(first.tokens) < 200
        # The freed slot goes to the next waiting request at once.
        deadline = time.monotonic() + 10
        while not second.updates:
            assert time.monotonic() < deadline, "the waiting request never started"
            time.sleep(0.01)
        assert engine.snapshot()["standard"] == {"waiting": 1, "running": 1}
    finally:
        engine.stop(drain=False)
    assert second.final is not None and second.final.error


def test_requests_count_as_waiting_in_their_group_from_the_moment_they_are_accepted(tiny):
    """Per-group waiting counts add up to the queue depth at every moment (metrics show both), also for requests
    the engine thread has not taken from its inbox yet."""
    engine = Engine(tiny.model, EngineConfig(groups=(GroupConfig("standard", 1), GroupConfig("ultraspeed", 1)),
                                             max_len=64))           # not started: nothing leaves the inbox
    params = SamplingParams(max_tokens=2)
    engine.submit([EngineRequest([1, 2], params, Collector()) for _ in range(3)])
    engine.submit([EngineRequest([1, 2], params, Collector(), group="ultraspeed")])
    assert engine.snapshot() == {"standard": {"waiting": 3, "running": 0}, "ultraspeed": {"waiting": 1, "running": 0}}
    assert engine.queue_depth() == 4
    engine.start()
    engine.stop(drain=True)
    assert engine.snapshot() == {"standard": {"waiting": 0, "running": 0}, "ultraspeed": {"waiting": 0, "running": 0}}
    assert engine.queue_depth() == 0


def test_stop_without_drain_ends_everything_with_an_error(tiny):
    engine = Engine(tiny.model, EngineConfig(groups=(GroupConfig("standard", 1),), max_len=256)).start()
    collectors = [Collector() for _ in range(3)]
    engine.submit([EngineRequest([1, 2], SamplingParams(max_tokens=200, ignore_eos=True), c) for c in collectors])
    engine.stop(drain=False)
    for c in collectors:
        assert c.done.is_set() and (c.final.error or c.final.finish_reason)
    assert any(c.final.error for c in collectors)


def start_decoding(engine, max_tokens: int) -> Collector:
    """Submit a request for `max_tokens` tokens after "a" and wait until it is decoding."""
    running = Collector()
    engine.submit([EngineRequest([ord("a")], SamplingParams(max_tokens=max_tokens, ignore_eos=True), running)])
    deadline = time.monotonic() + 10
    while not running.updates:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return running


def test_a_failing_forward_ends_its_requests_with_an_error_and_the_engine_keeps_serving(tiny):
    from tests.server.conftest import ScriptedModel
    model = ScriptedModel({"a": {"b": 1.0}, "b": {"a": 1.0}}, delay_s=0.005)
    engine = Engine(model, EngineConfig(groups=(GroupConfig("standard", 2),), max_len=64)).start()
    try:
        params = SamplingParams(max_tokens=5, ignore_eos=True)
        model.fail = True                          # the prefill fails
        c, = run(engine, [EngineRequest([ord("a")], params, None)])
        assert c.final.error and "injected fault" in c.final.error
        first = start_decoding(engine, 50)
        model.fail = True                          # a decode step fails: every row of the lane gets the error
        assert first.done.wait(10) and first.final.error
        c, = run(engine, [EngineRequest([ord("a")], params, None)])
        assert c.tokens == [ord(x) for x in "babab"] and c.final.finish_reason == "length"
    finally:
        engine.stop()


def test_a_request_that_cannot_start_fails_alone(tiny, monkeypatch):
    """Anything that goes wrong while admitting one request (here: building its generator) ends that request
    with an error; the requests running beside it, and the next ones, are untouched."""
    from tests.server.conftest import ScriptedModel
    from ultraspeed.engine import scheduler
    model = ScriptedModel({"a": {"b": 1.0}, "b": {"a": 1.0}}, delay_s=0.005)
    engine = Engine(model, EngineConfig(groups=(GroupConfig("standard", 2),), max_len=64)).start()
    make_generator = scheduler.make_generator

    def refuse_seed_13(seed, device):
        if seed == 13:
            raise ValueError("unusable seed")
        return make_generator(seed, device)
    monkeypatch.setattr(scheduler, "make_generator", refuse_seed_13)
    try:
        running = start_decoding(engine, 40)
        bad, = run(engine, [EngineRequest([ord("a")], SamplingParams(max_tokens=5, seed=13), None)])
        assert bad.final.error and "unusable seed" in bad.final.error and not bad.tokens
        assert running.done.wait(10) and running.final.finish_reason == "length" and len(running.tokens) == 40
        assert engine.snapshot()["standard"] == {"waiting": 0, "running": 0}
        good, = run(engine, [EngineRequest([ord("a")], SamplingParams(max_tokens=3, ignore_eos=True), None)])
        assert good.tokens == [ord(x) for x in "bab"]
    finally:
        engine.stop()


def test_the_engine_decodes_and_times_its_step_costs_with_its_own_threads(tiny, monkeypatch):
    """EngineConfig.threads applies on the engine's thread, where the step costs for adaptive verification are
    timed too: a decode thread beside an OpenMP team of the caller's ran twice as slow (libgomp stops spinning
    once it manages more threads than cores), so the server keeps the main thread on one."""
    import torch

    import ultraspeed.engine.scheduler as scheduler
    timed_on = []
    real = scheduler.measure_step_cost

    def recording(*args):
        timed_on.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*args)

    monkeypatch.setattr(scheduler, "measure_step_cost", recording)
    engine = Engine(tiny.model, EngineConfig(groups=GROUPS, max_len=128, threads=1), tiny.drafter)
    assert timed_on == []                                     # nothing timed on the caller's thread
    engine.start()
    seen = []
    collector = Collector()

    def on_update(update):
        seen.append(torch.get_num_threads())
        collector(update)

    try:
        engine.submit([EngineRequest([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), on_update,
                                     group="ultraspeed")])
        assert collector.done.wait(60) and collector.final.error is None
    finally:
        engine.stop()
    assert timed_on == [("ultraspeed-engine", 1)] and set(seen) == {1}


# ------------------------------------------------------------------------------------------ static runtime


def static_engine(tiny, **kw):
    config = EngineConfig(groups=GROUPS, max_len=128, max_queue=16, runtime="static", **kw)
    return Engine(tiny.model, config, tiny.drafter).start()


def test_static_runtime_lanes_match_single_sequence_greedy(tiny):
    """runtime="static" (what a GPU serves with, captured as CUDA graphs; eager here): both lanes replay the
    static step of their batch bucket while requests join and leave mid-flight (9 requests through 3 + 2 slots),
    some of them with repetitive prompts that draft by lookup, and produce exactly single-sequence greedy."""
    engine = static_engine(tiny, lookup=True)
    try:
        params = SamplingParams(max_tokens=14, ignore_eos=True)
        ps = prompts(7) + [[5, 9, 13, 5, 9, 13, 5, 9], [77, 3, 77, 3, 77]]
        groups = ["standard", "ultraspeed"] * 3 + ["standard", "ultraspeed", "ultraspeed"]
        got = run(engine, [EngineRequest(p, params, None, group=g) for p, g in zip(ps, groups)])
        for c, p in zip(got, ps):
            assert c.tokens == sum(generate_plain(tiny.model, p, params), []) and c.final.finish_reason == "length"
        spec = [c.final.stats for c, g in zip(got, groups) if g == "ultraspeed"]
        assert all(set(s.drafts_verified) == {tiny.drafter.config.block_size - 1} for s in spec)
        assert sum(s.lookup_steps for s in spec) > 0
        plain, spec = engine._plain.runner.graphs.steps, engine._spec.runner.graphs.steps
        assert plain and spec and not any(key[2] for key in [*plain, *spec])       # greedy steps only
        assert {key[0] for key in plain} <= {1, 2, 4, 5} and {key[:2] for key in spec} <= {(1, 4), (2, 4)}
        assert any(key[3] for key in spec)        # steps where every row looked up skipped the drafter
    finally:
        engine.stop()


def test_static_runtime_samples_reproducibly_beside_greedy_rows(tiny):
    """Sampled rows get the sampled step (a seeded request gives the same tokens alone and in a batch: its
    uniforms hash its seed and positions); greedy rows beside them stay exactly greedy."""
    engine = static_engine(tiny)
    try:
        p = prompts(3)
        sampled = SamplingParams(temperature=0.9, max_tokens=10, seed=11, ignore_eos=True)
        greedy = SamplingParams(max_tokens=10, ignore_eos=True)
        for group in ("standard", "ultraspeed"):
            together = run(engine, [EngineRequest(p[0], sampled, None, group=group),
                                    EngineRequest(p[1], greedy, None, group=group)])
            alone = run(engine, [EngineRequest(p[0], sampled, None, group=group)])
            assert together[0].tokens == alone[0].tokens and len(alone[0].tokens) == 10
            assert together[1].tokens == sum(generate_plain(tiny.model, p[1], greedy), [])
            other = run(engine, [EngineRequest(p[0], SamplingParams(temperature=0.9, max_tokens=10, seed=12,
                                                                    ignore_eos=True), None, group=group)])
            assert other[0].tokens != alone[0].tokens
        assert any(key[2] for key in engine._spec.runner.graphs.steps)
    finally:
        engine.stop()


def test_static_runtime_moves_unhelped_requests_to_the_plain_lane(tiny):
    engine = static_engine(tiny, min_accepted=100.0, probe_steps=3)
    try:
        params = SamplingParams(max_tokens=20, ignore_eos=True)
        ps = prompts(2)
        got = run(engine, [EngineRequest(p, params, None, group="ultraspeed") for p in ps])
    finally:
        engine.stop()
    for c, p in zip(got, ps):
        assert c.tokens == sum(generate_plain(tiny.model, p, params), []) and c.final.stats.plain_after == 3


def test_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="runtime"):
        EngineConfig(runtime="graphs")
