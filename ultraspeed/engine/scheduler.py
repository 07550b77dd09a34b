"""Continuous batching: one background thread owns the model and serves every request through a running batch.

Requests join the batch at token boundaries (their prompt is prefilled into a free cache row between two decode
steps) and leave it the moment they finish or are cancelled (the last row is moved into the freed one, so the
batch always occupies rows 0..b-1 and every step is one contiguous forward). Two lanes run side by side:

    plain lane        one KV cache; a step is ONE target forward over all rows ([b, 1] tokens; rows that left the
                      speculative lane also verify their lookup drafts in it)
    speculative lane  a target cache + a drafter cache; a step is one batched drafter forward ([b, B] block) and
                      one batched target verify ([b, B]); acceptance, rollback and the drafter's context update
                      are per row, so rows advance by different numbers of tokens

Groups (the server's tiers) cap how many of their requests run at once; a group marked speculative uses the
speculative lane when a drafter is loaded (else the plain lane), and a request on which the drafter does not pay
for itself (EngineConfig.min_accepted) moves to the plain lane after a few probe steps, with the same output. A
speculative request whose prompt leaves no room for a verify block near the end of the context runs in the plain
lane instead (rows there are sized for it).

Thread safety: `submit`, `cancel`, `stop` and the read-only `snapshot` may be called from any thread; they touch
only a lock-protected counter and a `queue.SimpleQueue` of commands. Everything else belongs to the engine thread.
Every accepted request receives exactly one final `Update` (finish_reason or error) through its callback.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ultraspeed.engine.generate import GenerationStats
from ultraspeed.engine.kv_cache import KVCache
from ultraspeed.engine.sampler import SamplingParams, make_generator, sample
from ultraspeed.engine.lookup_corpus import LookupCorpus
from ultraspeed.engine.lookup_draft import NgramIndex
from ultraspeed.engine.speculative import (append_context, features_of, gives_up, lookup_step, new_draft_cache,
                                           speculative_step)
from ultraspeed.engine.verify_length import StepCost, measure_step_cost
from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.decoder import Decoder
from ultraspeed.models.dflash import DFlashDrafter
from ultraspeed.runtime.device_sampling import seed_of
from ultraspeed.runtime.serving import StaticRunner
from ultraspeed.runtime.static_step import DecodeStep, SpeculativeStep, committed_tokens

log = logging.getLogger(__name__)


class QueueFull(UltraSpeedError):
    """The engine's waiting queue is at its bound: try again later."""


class EngineStopped(UltraSpeedError):
    """The engine is shutting down and accepts no new requests."""


@dataclass(frozen=True)
class GroupConfig:
    name: str
    max_running: int = 8            # sequences of this group decoding at once; the rest wait in the queue
    speculative: bool = False       # decode with the drafter when one is loaded


@dataclass(frozen=True)
class EngineConfig:
    groups: tuple[GroupConfig, ...] = (GroupConfig("standard", 8), GroupConfig("ultraspeed", 2, speculative=True))
    max_len: int = 2048             # cache positions per row (prompt + completion); capped by the model context
    max_queue: int = 64             # waiting requests (all groups); submit() beyond it raises QueueFull
    prefill_chunk: int = 512        # prompt tokens per prefill forward (bounds activation memory)
    # A speculative request whose drafter commits fewer than `min_accepted` tokens per step over its first
    # `probe_steps` steps moves to the plain lane (same tokens, cheaper steps). 0 = never; None = the break-even
    # of the measured step costs (needs adaptive_verify).
    min_accepted: float | None = 0.0
    probe_steps: int = 4
    # Verify only the drafts worth their time (engine/verify_length.py), from step costs timed at start-up;
    # False verifies whole blocks. Output is the same either way.
    adaptive_verify: bool = True
    # Speculative rows whose last tokens recur in their context draft what followed them (prompt lookup,
    # engine/lookup_draft.py) instead of the drafter's block. Output is the same either way.
    lookup: bool = False
    # CPU threads the engine's own thread computes with (torch.set_num_threads there; 0 leaves torch's default).
    threads: int = 0
    # "static": every lane step replays a preallocated step per batch bucket, captured as a CUDA graph on a GPU
    # (runtime/serving.py; whole blocks, sampling inside the graph); "dynamic": the ops of engine/speculative.py.
    runtime: str = "dynamic"

    def __post_init__(self) -> None:
        if self.runtime not in ("dynamic", "static"):
            raise ValueError(f"runtime must be 'dynamic' or 'static', not {self.runtime!r}")


@dataclass
class Update:
    """What the engine tells a request's callback: newly committed tokens, and at the end why it ended."""

    token_ids: list[int] = field(default_factory=list)
    accepted: int = 0                   # tokens the decode forward that produced these committed (0: prefill)
    finish_reason: str | None = None    # "stop" | "length" | "cancelled" on the final update
    error: str | None = None            # set on the final update instead when the request failed
    stats: GenerationStats | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False)
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    on_update: Callable[[Update], None]     # called on the engine thread: must be quick and must not block
    group: str = "standard"
    stop_ids: tuple[int, ...] = ()
    id: int = -1                            # assigned by submit()


@dataclass(eq=False)      # identity, not field equality: sequences are found in lists by `is`
class _Sequence:
    request: EngineRequest
    generator: torch.Generator
    max_new: int
    stats: GenerationStats
    stop: frozenset[int]
    last: int = -1                          # last committed token: not yet in the target cache
    pending: torch.Tensor | None = None     # speculative: features of committed tokens not yet in the draft cache
    lookup: NgramIndex | None = None        # speculative with lookup drafts: the prompt and every committed token
    started: float = 0.0
    seed: int = 0                           # the static runtime's sampling seed (runtime/device_sampling.py)


def _prefill_row(model: Decoder, cache: KVCache, row: int, prompt: list[int], chunk: int,
                 capture: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt into cache row `row` in chunks. Returns the last position's logits [V] and, if asked, the captured
    features of every prompt position [1, P, K*H]."""
    device = model.embed_tokens.weight.device
    ids = torch.tensor([prompt], device=device)
    cache.reset(row)
    parts, hidden = [], None
    for start in range(0, ids.shape[1], chunk):
        hidden, captured = model(ids[:, start:start + chunk], cache, capture, first_row=row)
        if capture:
            parts.append(features_of(captured))
    return model.logits(hidden[:, -1])[0], torch.cat(parts, dim=1) if capture else None


class _PlainLane:
    """Rows 0..b-1 of one cache; a decode step is one target forward over all of them. Rows that came from the
    speculative lane with a lookup index still verify lookup drafts (up to `lookup_slots` tokens) in that
    forward: they cost no drafter pass (engine/speculative.lookup_step)."""

    def __init__(self, model: Decoder, rows: int, max_len: int, chunk: int, lookup_slots: int = 0,
                 step_cost: StepCost | None = None, static: bool = False) -> None:
        self.model, self.chunk = model, chunk
        self.cache = model.new_cache(rows, max_len) if rows else None
        self.rows = rows
        self.seqs: list[_Sequence] = []
        self.lookup_slots, self.step_cost = lookup_slots, step_cost
        self.runner = StaticRunner(self._make_step, rows) if static and rows else None

    def _make_step(self, batch: int, _block: int, sampling: bool, _lookup_only: bool) -> DecodeStep:
        return DecodeStep(self.model, self.cache, batch, sampling=sampling)

    def admit(self, seq: _Sequence) -> torch.Tensor:
        """Prefill the prompt into the next free row; returns the last position's logits."""
        logits, _ = _prefill_row(self.model, self.cache, len(self.seqs), seq.request.prompt_ids, self.chunk)
        self.seqs.append(seq)
        return logits

    def fork(self, seq: _Sequence, parent: _Sequence) -> None:
        """Admit `seq`, whose prompt equals that of `parent` admitted in this same round: the parent's row holds
        exactly the prompt, so copying it replaces a prefill (n candidates share one)."""
        self.cache.move_row(self.seqs.index(parent), len(self.seqs))
        self.seqs.append(seq)

    def adopt(self, seq: _Sequence, cache: KVCache, row: int) -> None:
        """Continue a sequence decoded so far in another lane (same model): copy its cache row over."""
        self.cache.move_row(row, len(self.seqs), source=cache)
        seq.pending = None
        self.seqs.append(seq)

    def step(self) -> list[list[int]]:
        if self.runner is not None:
            return self._static_step()
        # Each row samples with its own parameters and generator (seeded requests stay reproducible in a batch).
        committed, _, looked_up = lookup_step(
            self.model, self.cache, [s.last for s in self.seqs], [s.lookup for s in self.seqs],
            [s.request.params for s in self.seqs], [s.generator for s in self.seqs], self.lookup_slots,
            self.step_cost)
        for s, looked in zip(self.seqs, looked_up):
            s.stats.lookup_steps += looked
        return committed

    def _static_step(self) -> list[list[int]]:
        b = len(self.seqs)
        tokens = self.runner.run(1, [s.last for s in self.seqs], self.cache.lengths[:b].tolist(),
                                 [s.request.params for s in self.seqs], [s.seed for s in self.seqs])
        self.cache.lengths[:b] += 1
        return [[t] for t in tokens.tolist()]

    def remove(self, row: int) -> None:
        last = len(self.seqs) - 1
        if row != last:
            self.cache.move_row(last, row)
            self.seqs[row] = self.seqs[last]
        self.seqs.pop()
        self.cache.reset(last)

    def clear(self) -> None:
        self.seqs.clear()
        if self.cache is not None:
            self.cache.reset()


class _SpeculativeLane:
    """DFlash for a batch (engine/speculative.speculative_step): every step drafts a block for each row in one
    drafter forward, verifies all blocks (or the prefix worth verifying) in one target forward, then accepts per
    row (greedy prefix or rejection sampling with the row's own parameters) and rolls each row's cache back over
    its rejected drafts. A seeded sampled request draws one uniform per verified draft: with adaptive
    verification, which picks one length per step for all rows, its tokens follow the target distribution exactly
    but may differ between running alone and in a batch (whole blocks make them identical)."""

    def __init__(self, target: Decoder, drafter: DFlashDrafter, rows: int, max_len: int, chunk: int,
                 step_cost: StepCost | None = None, lookup: bool = False, static: bool = False,
                 corpus: LookupCorpus | None = None) -> None:
        self.target, self.drafter, self.chunk, self.rows, self.lookup = target, drafter, chunk, rows, lookup
        self.corpus = corpus
        self.cache = target.new_cache(rows, max_len)
        self.draft_cache = new_draft_cache(drafter, rows, self.cache.max_len)
        self.capture = drafter.config.target_layer_ids
        self.seqs: list[_Sequence] = []
        self.step_cost = step_cost            # None: verify whole blocks
        self.runner = StaticRunner(self._make_step, rows) if static else None

    @property
    def block_size(self) -> int:
        return self.drafter.config.block_size

    def _make_step(self, batch: int, _block: int, sampling: bool, lookup_only: bool) -> SpeculativeStep:
        step = SpeculativeStep(self.target, self.drafter, self.cache, self.draft_cache, batch, sampling=sampling)
        return step.without_drafter() if lookup_only else step

    def admit(self, seq: _Sequence) -> torch.Tensor:
        row = len(self.seqs)
        logits, features = _prefill_row(self.target, self.cache, row, seq.request.prompt_ids, self.chunk,
                                        self.capture)
        self.draft_cache.reset(row)
        seq.pending = features
        seq.lookup = NgramIndex.of(seq.request.prompt_ids, self.corpus) if self.lookup else None   # _commit extends
        self.seqs.append(seq)
        return logits

    def fork(self, seq: _Sequence, parent: _Sequence) -> None:
        """As _PlainLane.fork; the parent has not stepped yet, so its prompt features are still pending (the
        tensor is shared read-only: a step replaces `pending`, never writes into it)."""
        row = len(self.seqs)
        self.cache.move_row(self.seqs.index(parent), row)
        self.draft_cache.reset(row)
        seq.pending = parent.pending
        seq.lookup = NgramIndex.of(seq.request.prompt_ids, self.corpus) if self.lookup else None
        self.seqs.append(seq)

    def step(self) -> list[list[int]]:
        if self.runner is not None:
            return self._static_step()
        committed, pending, verified, looked_up = speculative_step(
            self.target, self.drafter, self.cache, self.draft_cache, [s.last for s in self.seqs],
            [s.pending for s in self.seqs], [s.request.params for s in self.seqs],
            [s.generator for s in self.seqs], self.step_cost, [s.lookup for s in self.seqs] if self.lookup else None)
        for s, features, looked in zip(self.seqs, pending, looked_up):
            s.pending = features
            s.stats.drafts_verified.append(verified)
            s.stats.lookup_steps += looked
        return committed

    def _static_step(self) -> list[list[int]]:
        """The static step verifies whole blocks and writes the drafter's context of every verified position
        itself: only a newly admitted row's prompt features are still pending."""
        B = self.block_size
        for row, s in enumerate(self.seqs):
            if s.pending is not None:
                append_context(self.drafter, self.draft_cache, row, s.pending)
                s.pending = None
        lookups = [s.lookup.draft(B - 1)[0] if s.lookup is not None else [] for s in self.seqs]
        b = len(self.seqs)
        result = self.runner.run(B, [s.last for s in self.seqs], self.cache.lengths[:b].tolist(),
                                 [s.request.params for s in self.seqs], [s.seed for s in self.seqs], lookups)
        committed = committed_tokens(result)
        for row, (s, tokens, draft) in enumerate(zip(self.seqs, committed, lookups)):
            self.cache.lengths[row] += len(tokens)
            self.draft_cache.lengths[row] = self.cache.lengths[row]
            s.stats.drafts_verified.append(B - 1)
            s.stats.lookup_steps += bool(draft)
            if s.lookup is not None:
                s.lookup.record_step(len(tokens), bool(draft))
        return committed

    def remove(self, row: int) -> None:
        last = len(self.seqs) - 1
        if row != last:
            self.cache.move_row(last, row)
            self.draft_cache.move_row(last, row)
            self.seqs[row] = self.seqs[last]
        self.seqs.pop()
        self.cache.reset(last)
        self.draft_cache.reset(last)

    def clear(self) -> None:
        self.seqs.clear()
        self.cache.reset()
        self.draft_cache.reset()


def check_drafter(model: Decoder, drafter: DFlashDrafter) -> None:
    """A drafter trained for another target fails at the first draft; say so at startup instead."""
    d, t = drafter.config, model.config
    if d.hidden_size != t.hidden_size or d.vocab_size != t.vocab_size or max(d.target_layer_ids) >= t.num_layers:
        raise UltraSpeedError(f"the drafter does not fit this model (drafter: hidden {d.hidden_size}, vocab "
                              f"{d.vocab_size}, target layers {list(d.target_layer_ids)}; model: hidden "
                              f"{t.hidden_size}, vocab {t.vocab_size}, {t.num_layers} layers)")


class Engine:
    def __init__(self, model: Decoder, config: EngineConfig, drafter: DFlashDrafter | None = None,
                 lookup_corpus: LookupCorpus | None = None) -> None:
        """`lookup_corpus`: the target's earlier answers, drafted from where a request's own context has no
        n-gram match (with EngineConfig.lookup; engine/lookup_corpus.py)."""
        self.model, self.config, self.drafter = model, config, drafter
        if drafter is not None:
            check_drafter(model, drafter)
        if lookup_corpus is not None:
            lookup_corpus.check_vocab(model.config.vocab_size)
        self.groups = {g.name: g for g in config.groups}
        self.context_limit = min(config.max_len, model.config.max_position)
        spec_rows = sum(g.max_running for g in config.groups if g.speculative) if drafter is not None else 0
        # Every group may land in the plain lane (speculative requests near the context end do), so it has a row
        # for every running slot: admission then only ever checks group capacity.
        static = config.runtime == "static"
        self._plain = _PlainLane(model, sum(g.max_running for g in config.groups), self.context_limit,
                                 config.prefill_chunk, drafter.config.block_size - 1 if spec_rows else 0,
                                 static=static)
        self._spec = (_SpeculativeLane(model, drafter, spec_rows, self.context_limit, config.prefill_chunk,
                                       lookup=config.lookup, static=static, corpus=lookup_corpus)
                      if spec_rows else None)
        # Step costs for adaptive verification are timed on the engine's thread, with the threads it decodes with
        # (the static runtime verifies whole blocks).
        self._time_step_costs = bool(spec_rows and config.adaptive_verify and not static)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0                     # submitted, not yet admitted nor ended (bounded by max_queue)
        self._next_id = 0
        self._accepting = True
        self._waiting: deque[EngineRequest] = deque()
        self._running: dict[int, tuple[object, _Sequence]] = {}     # request id -> (lane, sequence)
        self._counts = {name: [0, 0] for name in self.groups}       # group -> [waiting, running]
        self._stop_mode: str | None = None   # None | "drain" | "now"
        self._thread: threading.Thread | None = None

    @property
    def speculative(self) -> bool:
        return self._spec is not None

    @property
    def block_size(self) -> int:
        return self._spec.block_size if self._spec else 1

    # -- any thread ------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ultraspeed-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, requests: list[EngineRequest]) -> list[int]:
        """Queue requests atomically (all or none); returns their ids. Raises QueueFull, EngineStopped, or
        UltraSpeedError for a request that can never run (unknown group, prompt that does not fit)."""
        for r in requests:
            if r.group not in self.groups:
                raise UltraSpeedError(f"unknown group {r.group!r}")
            if not r.prompt_ids:
                raise UltraSpeedError("the prompt is empty")
            if len(r.prompt_ids) >= self.context_limit:
                raise UltraSpeedError(f"prompt of {len(r.prompt_ids)} tokens does not fit the context of "
                                      f"{self.context_limit} tokens")
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the engine is shutting down")
            if self._thread is not None and not self._thread.is_alive():
                raise EngineStopped("the engine thread has stopped")
            if self._queued + len(requests) > self.config.max_queue:
                raise QueueFull(f"the queue is full ({self._queued} waiting)")
            self._queued += len(requests)
            for r in requests:
                r.id = self._next_id
                self._next_id += 1
                self._counts[r.group][0] += 1       # waiting from now on, like _queued (metrics add them up)
            # One command for the whole call: its requests (the n candidates) reach the waiting queue together,
            # so they are admitted in the same round and can share one prefill.
            self._inbox.put(("submit", list(requests)))
        return [r.id for r in requests]

    def cancel(self, request_id: int) -> None:
        """Free the request's slot at the next token boundary; its final update says "cancelled"."""
        self._inbox.put(("cancel", request_id))

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with drain, finish every accepted one first, else end them with an error."""
        with self._lock:
            self._accepting = False
        self._inbox.put(("stop", "drain" if drain else "now"))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and drain:
                self._inbox.put(("stop", "now"))
                self._thread.join()

    def queue_depth(self) -> int:
        return self._queued

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per group: waiting and running requests (a racy but consistent-enough read for metrics)."""
        return {name: {"waiting": c[0], "running": c[1]} for name, c in dict(self._counts).items()}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- engine thread ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        with torch.inference_mode():
            if self._time_step_costs:
                try:
                    self._plain.step_cost = self._spec.step_cost = measure_step_cost(self.model, self.drafter)
                except Exception:       # serve anyway: whole blocks are exact too, only slower on a CPU
                    log.exception("timing the step costs failed: verifying whole blocks")
            while True:
                idle = not (self._waiting or self._running)
                self._handle_commands(block=idle and self._stop_mode is None)
                if self._stop_mode == "now":
                    self._fail_everything("the server is shutting down")
                    return
                if self._stop_mode == "drain" and not (self._waiting or self._running):
                    return
                try:
                    self._admit_waiting()
                    for lane in (self._plain, self._spec):
                        if lane is not None and lane.seqs:
                            self._step(lane)
                except Exception as e:   # a bug in the bookkeeping: fail loudly per request, keep serving
                    log.exception("engine step failed")
                    self._fail_everything(f"engine error: {e}")

    def _handle_commands(self, block: bool) -> None:
        try:
            command = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                kind, arg = command
                if kind == "submit":
                    self._waiting.extend(arg)       # counted as waiting by submit already
                elif kind == "cancel":
                    self._cancel(arg)
                elif kind == "stop":
                    self._stop_mode = "now" if "now" in (arg, self._stop_mode) else arg
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _cancel(self, request_id: int) -> None:
        for r in self._waiting:
            if r.id == request_id:
                self._waiting.remove(r)
                self._dequeued(r)
                self._emit(r, Update(finish_reason="cancelled", stats=GenerationStats(len(r.prompt_ids))))
                return
        if request_id in self._running:
            lane, seq = self._running[request_id]
            self._retire(lane, seq)
            seq.stats.finish_reason = "cancelled"
            self._emit(seq.request, Update(finish_reason="cancelled", stats=seq.stats))

    def _dequeued(self, r: EngineRequest) -> None:
        with self._lock:
            self._counts[r.group][0] -= 1
            self._queued -= 1

    def _admit_waiting(self) -> None:
        # Scan in arrival order, skipping requests of a full group: one busy tier must not stall the other.
        # A request whose prompt equals one prefilled in this round (the n candidates of a call arrive together)
        # copies that row instead of prefilling, and samples its first token from the same logits.
        prefilled: list[tuple[object, _Sequence, torch.Tensor]] = []    # (lane, sequence, last-position logits)
        for r in list(self._waiting):
            group = self.groups[r.group]
            if self._counts[r.group][1] >= group.max_running:
                continue
            self._waiting.remove(r)
            self._dequeued(r)
            room = self.context_limit - len(r.prompt_ids)
            use_spec = (group.speculative and self._spec is not None
                        and r.params.max_tokens <= room - self._spec.block_size)
            lane = self._spec if use_spec else self._plain
            stats, seq = GenerationStats(prompt_tokens=len(r.prompt_ids)), None
            t0 = time.perf_counter()
            try:
                seq = _Sequence(r, make_generator(r.params.seed, self.model.embed_tokens.weight.device),
                                min(r.params.max_tokens, room), stats,
                                frozenset(() if r.params.ignore_eos else r.stop_ids), seed=seed_of(r.params))
                parent = next(((s, logits) for l, s, logits in prefilled
                               if l is lane and s.request.id in self._running and s.request.prompt_ids == r.prompt_ids),
                              None)
                if parent is not None:
                    lane.fork(seq, parent[0])
                    logits = parent[1]
                else:
                    logits = lane.admit(seq)
                    seq.stats.prefill_tokens = len(r.prompt_ids)
                    prefilled.append((lane, seq, logits))
                first = [int(sample(logits, r.params, seq.generator))]
            except Exception as e:   # a request that cannot start (its generator, its prefill) ends alone
                log.exception("admitting request %d failed", r.id)
                row = next((i for i, s in enumerate(lane.seqs) if s is seq), None)
                if row is not None:
                    lane.remove(row)
                self._emit(r, Update(error=f"prefill failed: {e}", stats=stats))
                continue
            seq.started = time.perf_counter()
            seq.stats.prefill_seconds = seq.started - t0
            self._running[r.id] = (lane, seq)
            self._counts[r.group][1] += 1
            self._commit(lane, seq, first, accepted=0)

    def _step(self, lane) -> None:
        try:
            new_tokens = lane.step()
        except Exception as e:   # a failed forward ends the requests in that lane, not the engine
            log.exception("decode step failed")
            for seq in list(lane.seqs):
                self._running.pop(seq.request.id, None)
                self._counts[seq.request.group][1] -= 1
                self._emit(seq.request, Update(error=f"decode failed: {e}", stats=seq.stats))
            lane.clear()
            return
        for seq, tokens in list(zip(lane.seqs, new_tokens)):
            self._commit(lane, seq, tokens, accepted=len(tokens))
        if lane is self._spec and self.config.min_accepted != 0:
            for seq in [s for s in lane.seqs
                        if gives_up(s.stats, self.config.min_accepted, self.config.probe_steps, lane.step_cost)]:
                self._to_plain_lane(seq)

    def _to_plain_lane(self, seq: _Sequence) -> None:
        """The drafter is not paying for its verify steps on this request: decode the rest plainly (verifying
        lookup drafts, which need no drafter). The plain lane has a row for every running slot, so there is
        always room."""
        row = self._spec.seqs.index(seq)
        self._plain.adopt(seq, self._spec.cache, row)
        self._spec.remove(row)         # seq.lookup stays: the plain lane verifies its lookup drafts
        self._running[seq.request.id] = (self._plain, seq)
        seq.stats.plain_after = len(seq.stats.accepted_lengths)

    def _commit(self, lane, seq: _Sequence, tokens: list[int], accepted: int) -> None:
        """Hand committed tokens to the request, cut at a stop token or the length limit; retire it if done."""
        stats, out, reason = seq.stats, [], None
        for t in tokens:
            out.append(t)
            stats.new_tokens += 1
            if t in seq.stop:
                reason = "stop"
                break
            if stats.new_tokens >= seq.max_new:
                reason = "length"
                break
        if accepted:
            stats.target_forwards += 1
            stats.accepted_lengths.append(accepted)
        stats.decode_seconds = time.perf_counter() - seq.started
        seq.last = tokens[-1]
        if seq.lookup is not None:
            seq.lookup.extend(out)
        if reason is not None:
            stats.finish_reason = reason
            self._retire(lane, seq)
        self._emit(seq.request, Update(out, accepted, reason, stats=stats if reason else None))

    def _retire(self, lane, seq: _Sequence) -> None:
        self._running.pop(seq.request.id, None)
        self._counts[seq.request.group][1] -= 1
        lane.remove(next(i for i, s in enumerate(lane.seqs) if s is seq))

    def _fail_everything(self, message: str) -> None:
        while self._waiting:
            r = self._waiting.popleft()
            self._dequeued(r)
            self._emit(r, Update(error=message))
        for _, seq in list(self._running.values()):
            self._running.pop(seq.request.id)
            self._counts[seq.request.group][1] -= 1
            self._emit(seq.request, Update(error=message, stats=seq.stats))
        for lane in (self._plain, self._spec):
            if lane is not None:
                lane.clear()

    @staticmethod
    def _emit(r: EngineRequest, update: Update) -> None:
        try:
            r.on_update(update)
        except Exception:   # a broken consumer must not take the engine down
            log.exception("request %d: update callback failed", r.id)
