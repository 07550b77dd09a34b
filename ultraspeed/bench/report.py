"""`ultraspeed bench report`: proof of speed, every system side by side on the same machine, weights and prompts.

Systems: our engine plain, with MXFP4 MLP/expert weights, with DFlash, and MXFP4 + DFlash (dense weights int8
on a CPU, as the engine serves by default); HF transformers `generate`, plain and with prompt-lookup assisted
generation; llama.cpp through llama-cpp-python, plain and with prompt-lookup decoding. A system that cannot run
here (a package not installed, no drafter, no GGUF file for the peers) is reported as missing, with the reason.

Each system runs in a fresh process of its own, one after the other: its peak RSS is then its own (weights,
caches, allocator) and not a sum of everything loaded before it, and no system inherits another's warm caches
or thread pools. Prompts are the held-out split of each domain (ultraspeed.train.prompts), tokenized once by
the parent with the model's chat template and given as the same token ids to every system. Decoding is greedy
with end-of-sequence ignored, so every system produces exactly --new-tokens tokens per prompt.

Per system and domain: median (and min/max) of tokens/s and time to first token over repeats x prompts, mean
accepted length (ours), peak memory; ratios of each of our systems to each reference; a DFlash block-size
sweep. Written as report.json, report.md and PNG charts (bench/plots.py).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

from ultraspeed.errors import UltraSpeedError
from ultraspeed.train.prompts import DOMAINS

OURS = ("ours_plain", "ours_mxfp4", "ours_dflash", "ours_mxfp4_dflash")
PEERS = ("hf_transformers", "hf_transformers_prompt_lookup", "llama_cpp", "llama_cpp_prompt_lookup")
SYSTEMS = OURS + PEERS
# DFlash system -> the system decoding plainly with the same weights (its speed-up is measured against it).
PLAIN_OF = {"ours_dflash": "ours_plain", "ours_mxfp4_dflash": "ours_mxfp4"}
PROMPT_LOOKUP_TOKENS = 10      # n-gram draft length of both peers' prompt lookup (HF's usual setting)
ALL = "all"                    # the scope pooling every domain's samples

PROMPT_SOURCES = {"code": "HumanEval tasks 120-163", "math": "word problems, evaluation seed",
                  "chat": "ShareGPT first turns, every 10th conversation", "agent": "tool-call transcripts, "
                  "evaluation seed"}
CHARTS = {"tokens_per_s": "tokens_per_s.png", "accepted_by_block": "accepted_by_block.png",
          "speedup_by_block": "speedup_by_block.png", "accepted_histogram": "accepted_histogram.png"}
GPU_NOTE = ("GPU mode: `python scripts/gpu_bench.py` on a CUDA machine (step time by block size, MXFP4 vs bf16 "
            "experts on a Qwen3-30B-A3B shape, bandwidth, projected tok/s) writes docs/gpu_bench_<date>.md; "
            "not measured on this machine.")


@dataclass(frozen=True)
class ReportConfig:
    model: str = "default"
    drafter: str | None = None            # None: the shipped drafter of the default model, if present
    systems: tuple[str, ...] = SYSTEMS
    domains: tuple[str, ...] = DOMAINS
    prompts_per_domain: int = 3
    new_tokens: int = 128
    repeats: int = 3
    block_sizes: tuple[int, ...] = (4, 8, 16)
    threads: int = 2
    scale_rule: str = "mse"               # MXFP4 systems: as the ultraspeed tier serves them ...
    rounding: str = "gptq"                # ... rounded by GPTQ (quant/gptq.py), or "nearest"
    verify: str = "adaptive"              # DFlash systems: "adaptive" (as generate runs) or "full" blocks
    lookup: bool = True                   # DFlash systems also draft by lookup where the context repeats (as served)
    lookup_corpus: str | None = None      # ... and from this corpus of the target's answers (as served)

    def __post_init__(self) -> None:
        if min(self.prompts_per_domain, self.new_tokens, self.repeats, self.threads, *self.block_sizes) < 1:
            raise UltraSpeedError("--prompts, --new-tokens, --repeats, --threads and --block-sizes must be >= 1")
        if unknown := set(self.systems) - set(SYSTEMS):
            raise UltraSpeedError(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
        if self.verify not in ("adaptive", "full"):
            raise UltraSpeedError(f"verify must be 'adaptive' or 'full', not {self.verify!r}")
        if self.rounding not in ("gptq", "nearest"):
            raise UltraSpeedError(f"rounding must be 'gptq' or 'nearest', not {self.rounding!r}")


def quick(cfg: ReportConfig) -> ReportConfig:
    """A smoke run: every number is produced once, cheaply (not a measurement to quote)."""
    return replace(cfg, repeats=1, prompts_per_domain=1, new_tokens=16)


# -- one generation ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    new_tokens: int
    seconds: float                          # call to last token
    ttft_s: float                           # call to first token (prefill included)
    accepted: tuple[int, ...] = ()          # tokens committed per target forward (ours only)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds


Runner = Callable[[list[int], int], Sample]


def drain(chunks: Iterator[Sequence[int]], limit: int, t0: float) -> tuple[int, float]:
    """Consume token chunks until `limit` tokens have come: (tokens, seconds from t0 to the first chunk)."""
    count, ttft = 0, 0.0
    for chunk in chunks:
        if count == 0:
            ttft = time.perf_counter() - t0
        count += len(chunk)
        if count >= limit:
            break
    return count, ttft


def ours_runner(model, cache, drafter=None, step_cost=None, lookup=False, corpus=None) -> Runner:
    from ultraspeed.engine.generate import GenerationStats, generate_plain
    from ultraspeed.engine.sampler import SamplingParams
    from ultraspeed.engine.speculative import generate_speculative, served_min_accepted

    def run(prompt: list[int], new_tokens: int) -> Sample:
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        stats = GenerationStats()
        t0 = time.perf_counter()
        chunks = (generate_plain(model, prompt, params, cache=cache, stats=stats) if drafter is None else
                  generate_speculative(model, drafter, prompt, params, cache=cache, stats=stats, step_cost=step_cost,
                                       lookup=lookup, min_accepted=served_min_accepted(step_cost is not None),
                                       corpus=corpus))
        count, ttft = drain(chunks, new_tokens, t0)
        return Sample(count, time.perf_counter() - t0, ttft, tuple(stats.accepted_lengths))

    return run


class FirstTokenClock:
    """A `generate` streamer noting when the first new tokens arrive (its first `put` is the prompt itself)."""

    def __init__(self) -> None:
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def hf_runner(gguf_path: Path, prompt_lookup: bool) -> Runner:
    """HF transformers on the same GGUF (dequantized to fp32 by transformers). Like bench/peers.py's runner,
    plus a streamer for the time to first token."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    extra = {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS} if prompt_lookup else {}

    def run(prompt: list[int], new_tokens: int) -> Sample:
        ids = torch.tensor([prompt])
        clock = FirstTokenClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock,
                                 **extra)
        seconds = time.perf_counter() - t0
        return Sample(out.shape[1] - ids.shape[1], seconds, (clock.first or t0 + seconds) - t0)

    return run


def llama_cpp_runner(gguf_path: Path, threads: int, context: int, prompt_lookup: bool) -> Runner:
    """llama.cpp on the same GGUF file through llama-cpp-python, optionally with its prompt-lookup decoding."""
    from llama_cpp import Llama
    kwargs = {}
    if prompt_lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        kwargs["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=PROMPT_LOOKUP_TOKENS)
    llm = Llama(model_path=str(gguf_path), n_threads=threads, n_ctx=context, verbose=False, **kwargs)

    def run(prompt: list[int], new_tokens: int) -> Sample:
        llm.reset()                 # no prompt-prefix reuse across runs: every system prefills the whole prompt
        t0 = time.perf_counter()
        # Llama.generate yields one token at a time and, unlike create_completion, does not stop at an
        # end-of-sequence token: exactly `new_tokens` greedy tokens, like the other systems.
        tokens = llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        count, ttft = drain(([t] for t in tokens), new_tokens, t0)
        return Sample(count, time.perf_counter() - t0, ttft)

    return run


# -- one system, in its own process --------------------------------------------------------------------------


@dataclass(frozen=True)
class SystemJob:
    """All one child process needs to measure one system (picklable: plain data only)."""
    name: str
    model: str
    drafter: str | None
    prompts: dict[str, list[list[int]]]
    new_tokens: int
    repeats: int
    threads: int
    scale_rule: str
    block_sizes: tuple[int, ...]
    verify: str = "adaptive"
    lookup: bool = True
    lookup_corpus: str | None = None
    rounding: str = "gptq"

    def context_tokens(self, block_size: int = 0) -> int:
        """KV room to allocate: the longest prompt, the new tokens and one draft block (or lookup) past them.
        Sized to need, so that no system's memory includes a context it never uses."""
        longest = max(len(p) for prompts in self.prompts.values() for p in prompts)
        return longest + self.new_tokens + max(PROMPT_LOOKUP_TOKENS, block_size, *self.block_sizes) + 1


def rss_mb() -> float | None:
    """Resident memory now (Linux /proc), None where unknown."""
    import os
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10       # bytes on macOS, KiB elsewhere


def import_for(name: str) -> None:
    """Import what a system needs before the memory baseline, so the baseline holds libraries and the rest is
    the system's own: weights, caches, activations."""
    import torch  # noqa: F401
    if name.startswith("hf_"):
        import transformers  # noqa: F401
    elif name.startswith("llama_cpp"):
        import llama_cpp  # noqa: F401
    else:
        import ultraspeed.engine.speculative  # noqa: F401
        import ultraspeed.loader  # noqa: F401


def build_runners(job: SystemJob) -> tuple[dict[int, Runner], dict]:
    """The runner(s) of `job.name` -> ({block size or 0: runner}, facts to report). A DFlash system gets one
    runner per block size swept; the others one runner under key 0."""
    from ultraspeed.loader import resolve_model_path
    if job.name.startswith("hf_"):
        return {0: hf_runner(resolve_model_path(job.model), job.name.endswith("prompt_lookup"))}, {}
    if job.name.startswith("llama_cpp"):
        return {0: llama_cpp_runner(resolve_model_path(job.model), job.threads, job.context_tokens(),
                                    job.name.endswith("prompt_lookup"))}, {}
    from ultraspeed.loader import load_model
    from ultraspeed.quant.int8 import apply_weight_format, match_drafter_weights
    loaded = load_model(job.model)
    facts = {}
    if "mxfp4" in job.name:
        # Before int8: MXFP4 takes the MLP/expert Linears first, int8 then takes the remaining dense ones.
        from ultraspeed.quant.apply import cpu_kernel, quantize_experts
        if job.rounding == "gptq":      # as the ultraspeed tier serves it; prepare_mxfp4 calibrated it already
            from ultraspeed.loader import cache_dir
            from ultraspeed.quant.gptq import gptq_mxfp4_copy
            gptq_mxfp4_copy(loaded, job.scale_rule, cache_dir() / "gptq", in_place=True)
        else:
            quantize_experts(loaded.model, job.scale_rule)
        facts["mxfp4"] = {"scale_rule": job.scale_rule, "rounding": job.rounding,
                          "packed_matmul": "cpu_gemm (compiled)" if cpu_kernel() else "reference"}
    facts["weights"] = apply_weight_format(loaded.model, "auto")
    if "dflash" not in job.name:
        return {0: ours_runner(loaded.model, loaded.model.new_cache(1, job.context_tokens()))}, facts
    from ultraspeed.engine.verify_length import measure_step_cost, serving_block_size
    from ultraspeed.models.dflash import load_drafter, with_block_size
    drafter = load_drafter(job.drafter, target=loaded.config)
    match_drafter_weights(drafter, facts["weights"], loaded.model)
    # The headline block is the one generate and serve draft on this device (8 on a CPU); the sweep adds the rest.
    facts["block_size"] = serving_block_size(drafter.config.block_size, 0, loaded.model.embed_tokens.weight.device)
    facts["drafter_block_size"] = drafter.config.block_size
    cache = loaded.model.new_cache(1, job.context_tokens(drafter.config.block_size))   # one, shared by the sweep
    blocks = sorted({facts["block_size"], *job.block_sizes})
    facts["verify"] = job.verify
    facts["lookup"] = job.lookup
    corpus = None
    if job.lookup_corpus:
        from ultraspeed.engine.lookup_corpus import LookupCorpus
        corpus = LookupCorpus.load(job.lookup_corpus, loaded.model.config.vocab_size)
        facts["lookup_corpus"] = {"path": job.lookup_corpus, "sequences": corpus.num_sequences}
    drafters = {b: with_block_size(drafter, b) for b in blocks}
    costs = ({b: measure_step_cost(loaded.model, d) for b, d in drafters.items()} if job.verify == "adaptive"
             else {})
    if costs:
        facts["step_costs"] = {str(b): asdict(c) for b, c in costs.items()}
    return {b: ours_runner(loaded.model, cache, d, costs.get(b), job.lookup, corpus)
            for b, d in drafters.items()}, facts


def collect(runner: Runner, job: SystemJob, label: str) -> dict[str, list[Sample]]:
    """Samples per domain. Repeats are the outer loop, so slow drift of the machine spreads over all domains."""
    first = next(p for prompts in job.prompts.values() for p in prompts)
    runner(first, min(8, job.new_tokens))                       # warm-up: first-call allocations, lazy init
    samples: dict[str, list[Sample]] = {d: [] for d in job.prompts}
    total = job.repeats * sum(len(p) for p in job.prompts.values())
    with tqdm(total=total, desc=label, unit="gen", leave=False) as bar:
        for _ in range(job.repeats):
            for domain, prompts in job.prompts.items():
                for prompt in prompts:
                    samples[domain].append(runner(prompt, job.new_tokens))
                    bar.update(1)
    return samples


def measure_system(job: SystemJob) -> dict:
    """Runs in a fresh process: build the system, measure it on every prompt, report its memory."""
    import torch
    torch.set_num_threads(job.threads)
    import_for(job.name)
    baseline = rss_mb()
    runners, facts = build_runners(job)
    per_block = {b: summarize_domains(collect(r, job, f"{job.name}" + (f" block {b}" if b else "")))
                 for b, r in runners.items()}
    headline = per_block[facts.get("block_size", 0)]
    peak, end = peak_rss_mb(), rss_mb()
    result = {**headline, **facts, "memory_mb": {
        "peak_rss": round(peak, 1), "baseline_rss": None if baseline is None else round(baseline, 1),
        "extra_peak": None if baseline is None else round(peak - baseline, 1),
        # After measuring: what serving holds, without the transient copies of loading.
        "end_rss": None if end is None else round(end, 1)}}
    if "block_size" in facts:
        result["blocks"] = {str(b): s for b, s in per_block.items()}
    return result


def run_in_fresh_process(job: SystemJob) -> dict:
    return in_fresh_process(measure_system, job)


def in_fresh_process(fn, *args):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def prepare_mxfp4(model: str, scale_rule: str) -> None:
    """Calibrate the served tier's GPTQ rounding into its disk cache (as `serve` does at its first start), so the
    MXFP4 systems load it instead of paying the calibration's time and memory inside their measurements."""
    from ultraspeed.loader import cache_dir, load_model
    from ultraspeed.quant.gptq import gptq_mxfp4_copy
    gptq_mxfp4_copy(load_model(model), scale_rule, cache_dir() / "gptq", in_place=True)


# -- pure summaries ------------------------------------------------------------------------------------------


def spread(values: list[float], digits: int) -> dict:
    # Rounding is monotone, so the rounded median still lies within the rounded [min, max].
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def summarize(samples: list[Sample]) -> dict:
    out = {"samples": len(samples), "tokens_per_s": spread([s.tokens_per_s for s in samples], 2),
           "ttft_s": spread([s.ttft_s for s in samples], 4)}
    accepted = [a for s in samples for a in s.accepted]
    if accepted:
        out["mean_accepted"] = round(sum(accepted) / len(accepted), 3)
        out["accepted_histogram"] = {str(k): accepted.count(k) for k in range(1, max(accepted) + 1)}
    return out


def summarize_domains(samples: dict[str, list[Sample]]) -> dict:
    return {"domains": {d: summarize(s) for d, s in samples.items()},
            ALL: summarize([x for s in samples.values() for x in s])}


def measured(systems: dict) -> dict:
    return {name: s for name, s in systems.items() if ALL in s}


def rate(system: dict, scope: str) -> float:
    return (system[ALL] if scope == ALL else system["domains"][scope])["tokens_per_s"]["median"]


def ratios(systems: dict, scopes: Sequence[str]) -> dict:
    """ratios[ours][reference][scope]: median tok/s of our system over the reference's (our plain engine and
    every peer are references)."""
    done = measured(systems)
    references = [n for n in done if n in PEERS or n == "ours_plain"]
    return {ours: {ref: {scope: round(rate(done[ours], scope) / rate(done[ref], scope), 3)
                         for scope in (*scopes, ALL)}
                   for ref in references if ref != ours}
            for ours in done if ours in OURS}


def add_block_speedups(systems: dict, scopes: Sequence[str]) -> None:
    """Each DFlash block's speed-up over plain decoding of the same weights, where that was measured too."""
    done = measured(systems)
    for name, plain in PLAIN_OF.items():
        if name in done and plain in done:
            for block in done[name]["blocks"].values():
                block["speedup_vs_plain"] = {scope: round(rate(block, scope) / rate(done[plain], scope), 3)
                                             for scope in (*scopes, ALL)}


def missing_reason(name: str, model_path: Path, drafter: Path | None) -> str | None:
    """Why `name` cannot run here, or None."""
    if "dflash" in name:
        if drafter is None:
            return "no DFlash drafter (none shipped in ultraspeed/drafters/; pass --drafter PATH)"
        if not drafter.exists():
            return f"drafter {drafter} not found"
    if name in PEERS:
        from ultraspeed.bench.peers import available_peers
        peer = "hf_transformers" if name.startswith("hf_") else "llama_cpp"
        if reason := available_peers()[peer]:
            return reason
        if model_path.suffix != ".gguf":
            return "peers run on a .gguf model only (the same weights file as ours)"
    return None


# -- the report ----------------------------------------------------------------------------------------------


def run_report(cfg: ReportConfig, out_dir: Path) -> dict:
    import torch
    from ultraspeed.bench.machine import describe_machine
    from ultraspeed.drafters import drafter_for
    from ultraspeed.loader import load_model, resolve_model_path
    from ultraspeed.train.prompts import domain_prompts
    torch.set_num_threads(cfg.threads)            # so the machine record shows the threads every system gets
    loaded = load_model(cfg.model)                # tokenizer and source only; each system loads its own copy
    tok = loaded.tokenizer
    prompts = {d: [tok.encode_chat(m) for m in domain_prompts(d, "eval", cfg.prompts_per_domain)]
               for d in cfg.domains}
    drafter = drafter_for(cfg.model, cfg.drafter)
    model_path = resolve_model_path(cfg.model)
    report = {"bench": "report", "machine": describe_machine(), "model": loaded.source,
              "drafter": str(drafter) if drafter else None, "config": asdict(cfg), "greedy": True,
              "prompts": {d: {"count": len(p), "source": PROMPT_SOURCES.get(d, d),
                              "mean_tokens": round(statistics.mean(len(x) for x in p), 1)}
                          for d, p in prompts.items()},
              "systems": {}}
    partial = out_dir / PARTIAL_DIR
    if cfg.rounding == "gptq" and any("mxfp4" in name for name in cfg.systems):
        in_fresh_process(prepare_mxfp4, cfg.model, cfg.scale_rule)
    for name in tqdm(cfg.systems, desc="bench report", unit="system"):
        reason = missing_reason(name, model_path, drafter)
        if reason:
            report["systems"][name] = {"missing": reason}
            continue
        job = SystemJob(name, cfg.model, str(drafter) if drafter else None, prompts, cfg.new_tokens, cfg.repeats,
                        cfg.threads, cfg.scale_rule, tuple(cfg.block_sizes), cfg.verify, cfg.lookup,
                        cfg.lookup_corpus if cfg.lookup else None, cfg.rounding)
        done = load_measured(partial, job)
        if done is not None:
            report["systems"][name] = done
            report.setdefault("resumed_systems", []).append(name)
            continue
        try:
            report["systems"][name] = run_in_fresh_process(job)
            save_measured(partial, job, report["systems"][name])
        except Exception as e:      # one broken system must not cost the others' numbers; the CLI exits 1
            report["systems"][name] = {"failed": f"{type(e).__name__}: {e}"}
    add_block_speedups(report["systems"], cfg.domains)
    report["ratios"] = ratios(report["systems"], cfg.domains)
    report["charts"] = write_charts(report, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(format_markdown(report))
    shutil.rmtree(partial, ignore_errors=True)     # complete: the next run measures everything afresh
    return report


# A long report (an hour or more on a small CPU) keeps each measured system here until the report is written, so
# a run that is interrupted resumes with the systems it has not measured yet (same job only).
PARTIAL_DIR = ".partial"


def _job_key(job: SystemJob) -> str:
    return json.dumps(asdict(job), sort_keys=True)


def save_measured(partial: Path, job: SystemJob, result: dict) -> None:
    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / f"{job.name}.json.tmp"
    tmp.write_text(json.dumps({"job": _job_key(job), "result": result}))
    tmp.replace(partial / f"{job.name}.json")


def load_measured(partial: Path, job: SystemJob) -> dict | None:
    """The result an interrupted run saved for exactly this job, else None."""
    path = partial / f"{job.name}.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved["result"] if saved.get("job") == _job_key(job) else None


# -- charts --------------------------------------------------------------------------------------------------


def chart_data(report: dict) -> dict[str, dict]:
    """The data of each chart (empty where nothing was measured for it). Block charts draw one line per DFlash
    system and domain; the histogram, the first DFlash system at the block size it is served with, per domain."""
    done = measured(report["systems"])
    domains = list(report["prompts"])
    dflash = {n: s for n, s in done.items() if "blocks" in s}
    data = {"tokens_per_s": {n: {d: rate(s, d) for d in (*domains, ALL)} for n, s in done.items()},
            "accepted_by_block": {}, "speedup_by_block": {}, "accepted_histogram": {}}
    for name, s in dflash.items():
        for d in domains:
            blocks = {int(b): x["domains"][d] for b, x in s["blocks"].items()}
            data["accepted_by_block"][f"{name} {d}"] = {b: x["mean_accepted"] for b, x in blocks.items()}
            speedups = {int(b): x["speedup_vs_plain"][d] for b, x in s["blocks"].items() if "speedup_vs_plain" in x}
            if speedups:
                data["speedup_by_block"][f"{name} {d}"] = speedups
    for name, s in list(dflash.items())[:1]:
        block = s["block_size"]
        hists = {d: s["blocks"][str(block)]["domains"][d]["accepted_histogram"] for d in domains}
        # Every length up to the block size, so the chart shows how far from a full block the drafts stop.
        data["accepted_histogram"] = {f"{name} {d} (block {block})":
                                      {k: h.get(str(k), 0) for k in range(1, block + 1)} for d, h in hists.items()}
    return data


def write_charts(report: dict, out_dir: Path) -> dict:
    """Draw every chart that has data: {chart: file name}, or {"missing": why} without matplotlib."""
    try:
        from ultraspeed.bench import plots
        import matplotlib  # noqa: F401
    except ImportError:
        return {"missing": "matplotlib not installed (pip install matplotlib)"}
    draw = {"tokens_per_s": plots.tokens_per_s_chart, "accepted_by_block": plots.accepted_by_block_chart,
            "speedup_by_block": plots.speedup_by_block_chart, "accepted_histogram": plots.accepted_histogram_chart}
    written = {}
    for chart, data in chart_data(report).items():
        if data:
            draw[chart](data, out_dir / CHARTS[chart])
            written[chart] = CHARTS[chart]
    return written


# -- Markdown ------------------------------------------------------------------------------------------------


def _status(s: dict) -> str | None:
    if "missing" in s:
        return f"missing: {s['missing']}"
    if "failed" in s:
        return f"failed: {s['failed']}"
    return None


def _or_dash(x) -> str:
    return "-" if x is None else str(x)


def _range(x: dict, fmt: str = "{}") -> str:
    return f"{fmt.format(x['median'])} ({fmt.format(x['min'])}–{fmt.format(x['max'])})"


def format_markdown(report: dict) -> str:
    m, cfg = report["machine"], report["config"]
    scopes = [*report["prompts"], ALL]
    lines = ["# ultraspeed bench report", "",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} threads per system, "
             f"device {m['device']}, torch {m['torch']}, python {m['python']}"
             + (f", load average {m['load_average']:.2f}" if "load_average" in m else "") + f"; {m['date']}",
             f"- model: `{report['model']}`; drafter: `{report['drafter']}`",
             f"- greedy, {cfg['new_tokens']} new tokens per prompt (end of sequence ignored), {cfg['repeats']} "
             f"repeat(s); held-out prompts: " + ", ".join(f"{d} {p['count']} ({p['source']}, ~{p['mean_tokens']:.0f} "
                                                          f"tokens)" for d, p in report["prompts"].items())]
    if m["device"] == "cpu":
        lines.append(f"- {GPU_NOTE}")
    lines += ["", "## Systems (all prompts)", "",
              "| system | tok/s median (min–max) | TTFT s median (min–max) | mean accepted | peak RSS MB | "
              "extra MB | RSS after MB |", "|---|---|---|---|---|---|---|"]
    for name, s in report["systems"].items():
        if status := _status(s):
            lines.append(f"| {name} | {status} | | | | | |")
            continue
        a, mem = s[ALL], s["memory_mb"]
        lines.append(f"| {name} | {_range(a['tokens_per_s'])} | {_range(a['ttft_s'], '{:.3f}')} | "
                     f"{a.get('mean_accepted', '-')} | {mem['peak_rss']} | {_or_dash(mem['extra_peak'])} | "
                     f"{_or_dash(mem['end_rss'])} |")
    done = measured(report["systems"])
    lines += ["", "## tok/s per domain (median)", "", "| system | " + " | ".join(scopes) + " |",
              "|---" * (len(scopes) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(str(rate(s, d)) for d in scopes) + " |" for n, s in done.items()]
    pairs = [(o, r, v) for o, refs in report["ratios"].items() for r, v in refs.items()]
    if pairs:
        lines += ["", "## Ratios: ours / reference (median tok/s)", "",
                  "| ours | reference | " + " | ".join(scopes) + " |", "|---" * (len(scopes) + 2) + "|"]
        lines += [f"| {o} | {r} | " + " | ".join(f"{v[d]}x" for d in scopes) + " |" for o, r, v in pairs]
    dflash = {n: s for n, s in done.items() if "blocks" in s}
    if dflash:
        lines += ["", "## DFlash by block size: mean accepted length, speed-up over the same weights' plain "
                  "decoding", "", "| system | block | " + " | ".join(scopes) + " |", "|---" * (len(scopes) + 2) + "|"]
        for name, s in dflash.items():
            for block, b in s["blocks"].items():
                cells = []
                for d in scopes:
                    x = b[ALL] if d == ALL else b["domains"][d]
                    speedup = b.get("speedup_vs_plain", {}).get(d)
                    cells.append(f"{x['mean_accepted']}" + ("" if speedup is None else f", {speedup}x"))
                star = " (as served)" if int(block) == s["block_size"] else ""
                lines.append(f"| {name} | {block}{star} | " + " | ".join(cells) + " |")
    charts = report.get("charts", {})
    lines += ["", "## Charts", ""]
    if "missing" in charts:
        lines.append(f"Charts missing: {charts['missing']}")
    lines += [f"![{chart}]({file})" for chart, file in charts.items() if chart != "missing"]
    lines += ["", "## How it was measured", "",
              "- tok/s: new tokens / wall time from the call to the last token (prefill included); TTFT: call to "
              "first token. Medians over repeats x prompts; one warm-up generation per system first.",
              "- mean accepted: tokens committed per target forward (1 for plain decoding). DFlash verifies "
              + ("only the drafts worth their time (adaptive, as generate and serve run it; whole-block "
                 "acceptance per domain: `ultraspeed bench acceptance`)." if cfg.get("verify", "adaptive") == "adaptive"
                 else "whole blocks (--verify full).")
              + (" Where the context repeats, drafts come from there (lookup drafts, as generate and serve run "
                 "by default)" + (", else from the target's own answers to training prompts where they match "
                                  "(--lookup-corpus)" if cfg.get("lookup_corpus") else "")
                 + ", elsewhere from the drafter." if cfg.get("lookup", False) else
                 " Drafts come from the drafter alone (--no-lookup)."),
              "- Every system runs alone in a fresh process. peak RSS: that process's peak resident memory "
              "(getrusage maxrss, loading included); extra: peak minus its resident memory after imports, before "
              "loading weights; RSS after: resident memory once measured (what serving holds).",
              "- Ours: dense weights int8 on a CPU (the engine's default), MXFP4 on the MLP/expert weights where "
              f"named ({'rounded by GPTQ, as the ultraspeed tier serves them' if cfg.get('rounding') == 'gptq' else 'rounded to nearest'}, "
              f"`{cfg.get('scale_rule', 'ceil')}` scales); DFlash headline at the block size `generate` and `serve` "
              "draft on this device, the others in the block table; peers: the same GGUF file (HF transformers "
              f"dequantizes it to fp32), prompt lookup drafting {PROMPT_LOOKUP_TOKENS} tokens.", ""]
    return "\n".join(lines)


def failed_systems(report: dict) -> list[str]:
    return [n for n, s in report["systems"].items() if "failed" in s]
