"""`ultraspeed bench speed`: greedy decode tokens/s of our engine beside HF transformers and llama.cpp,
on the same machine, prompts and GGUF weights, medians over repeats, ratios computed within this one run."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ultraspeed.bench.machine import describe_machine, median
from ultraspeed.bench.peers import Runner, available_peers, hf_transformers_runner, llama_cpp_runner
from ultraspeed.engine.generate import GenerationStats, generate_plain
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.engine.verify_length import measure_step_cost
from ultraspeed.loader import load_model, resolve_model_path
from ultraspeed.quant.int8 import apply_weight_format, match_drafter_weights

BENCH_PROMPTS = (
    "Explain in detail how a hash map works and when to use one.",
    "Write a Python function that returns the n-th Fibonacci number, with comments.",
    "Describe the water cycle to a ten-year-old.",
)


@dataclass(frozen=True)
class SpeedConfig:
    model: str = "default"
    new_tokens: int = 128
    repeats: int = 3
    threads: int = 2
    peers: tuple[str, ...] = ("hf_transformers", "llama_cpp")
    drafter: str | None = None


def engine_runner(loaded, drafter=None, step_cost=None) -> Runner:
    from ultraspeed.engine.speculative import generate_speculative
    cache = loaded.model.new_cache(1, 2048)

    def run(prompt: list[int], new_tokens: int) -> tuple[int, float]:
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        stats = GenerationStats()
        t0 = time.perf_counter()
        if drafter is None:
            tokens = generate_plain(loaded.model, prompt, params, cache=cache, stats=stats)
        else:
            tokens = generate_speculative(loaded.model, drafter, prompt, params, cache=cache, stats=stats,
                                          step_cost=step_cost)
        for _ in tokens:
            pass
        run.last_stats = stats
        return stats.new_tokens, time.perf_counter() - t0

    return run


def measure(runner: Runner, prompts: list[list[int]], new_tokens: int, repeats: int, label: str) -> dict:
    runner(prompts[0], 8)                                   # warm-up: first-call allocations, lazy init
    rates, mean_accepted = [], []
    for _ in tqdm(range(repeats), desc=f"bench speed: {label}", unit="round", leave=False):
        for prompt in prompts:
            n, seconds = runner(prompt, new_tokens)
            rates.append(n / seconds)
            stats = getattr(runner, "last_stats", None)
            if stats is not None:
                mean_accepted.append(stats.mean_accepted)
    result = {"tokens_per_s": round(median(rates), 2), "samples": len(rates),
              "min": round(min(rates), 2), "max": round(max(rates), 2)}
    if mean_accepted:
        result["mean_accepted"] = round(median(mean_accepted), 3)
    return result


def run_speed_bench(cfg: SpeedConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    loaded = load_model(cfg.model)
    prompts = [loaded.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in BENCH_PROMPTS]
    report = {"bench": "speed", "machine": describe_machine(), "model": loaded.source,
              "new_tokens": cfg.new_tokens, "repeats": cfg.repeats, "greedy": True, "systems": {}}
    systems = report["systems"]
    # The checkpoint's own precision (fp32 here) first, then the same model with int8 dense weights.
    systems["ultraspeed_plain_fp32"] = measure(engine_runner(loaded), prompts, cfg.new_tokens, cfg.repeats,
                                               "ours plain fp32")
    report["weights"] = apply_weight_format(loaded.model, "auto")
    if report["weights"] != "checkpoint":
        systems["ultraspeed_plain"] = measure(engine_runner(loaded), prompts, cfg.new_tokens, cfg.repeats,
                                              f"ours plain {report['weights']}")
    else:
        systems["ultraspeed_plain"] = systems["ultraspeed_plain_fp32"]
    if cfg.drafter:
        from ultraspeed.models.dflash import load_drafter
        drafter = load_drafter(cfg.drafter, target=loaded.config)
        match_drafter_weights(drafter, report["weights"], loaded.model)
        step_cost = measure_step_cost(loaded.model, drafter)            # adaptive verification, as generate runs
        systems["ultraspeed_dflash"] = measure(engine_runner(loaded, drafter, step_cost), prompts, cfg.new_tokens,
                                               cfg.repeats, "ours dflash")
    gguf_path = resolve_model_path(cfg.model)
    missing = available_peers()
    for peer in cfg.peers:
        if missing.get(peer):
            systems[peer] = {"missing": missing[peer]}
            continue
        if gguf_path.suffix != ".gguf":
            systems[peer] = {"missing": "peers run on a .gguf model only"}
            continue
        runner = (hf_transformers_runner(gguf_path) if peer == "hf_transformers"
                  else llama_cpp_runner(gguf_path, cfg.threads))
        systems[peer] = measure(runner, prompts, cfg.new_tokens, cfg.repeats, peer)
    ours = systems["ultraspeed_plain"]["tokens_per_s"]
    report["ratios"] = {f"ultraspeed_plain_vs_{name}": round(ours / s["tokens_per_s"], 3)
                        for name, s in systems.items() if not name.startswith("ultraspeed_plain")
                        and s.get("tokens_per_s")}
    return report


def format_table(report: dict) -> str:
    lines = ["| system | tok/s (median) | min | max | samples |", "|---|---|---|---|---|"]
    for name, s in report["systems"].items():
        if "missing" in s:
            lines.append(f"| {name} | missing: {s['missing']} | | | |")
        else:
            lines.append(f"| {name} | {s['tokens_per_s']} | {s['min']} | {s['max']} | {s['samples']} |")
    return "\n".join(lines)
