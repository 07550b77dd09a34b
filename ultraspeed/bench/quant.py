"""`ultraspeed bench quant`: what MXFP4 experts cost and save, on held-out text.

Variants: the original model; MXFP4 round-to-nearest of its expert targets (quant/apply.py); and, if given, a
QAT checkpoint (`ultraspeed qat`). For each: perplexity on held-out text (ShareGPT eval turns and HumanEval eval
tasks, prompt + canonical solution; per domain and overall), bytes of the expert weights, and greedy decode
tok/s (medians over repeats). Perplexity windows pack the texts of one domain, EOS-separated, into fixed-length
windows; every token but a window's first is scored.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ultraspeed.bench.machine import describe_machine
from ultraspeed.bench.speed import BENCH_PROMPTS, engine_runner, measure
from ultraspeed.loader import LoadedModel, load_model
from ultraspeed.models.decoder import Decoder
from ultraspeed.quant.apply import cpu_kernel, expert_weight_bytes, quantize_experts
from ultraspeed.quant.gptq import gptq_mxfp4_copy
from ultraspeed.quant.mxfp4 import BITS_PER_WEIGHT
from ultraspeed.train.text_corpus import corpus_texts, token_windows


@dataclass(frozen=True)
class QuantBenchConfig:
    model: str = "default"
    qat: str | None = None
    scale_rule: str = "ceil"
    chat_texts: int = 200
    window: int = 512
    new_tokens: int = 32
    repeats: int = 3
    threads: int = 2


@torch.inference_mode()
def next_token_nll(model: Decoder, windows: list[list[int]]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over all windows, and the number of tokens scored."""
    nll, count = 0.0, 0
    for ids in windows:
        hidden, _ = model(torch.tensor([ids]), model.new_cache(1, len(ids)))
        logits = model.logits(hidden[0, :-1]).float()
        nll += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return nll, count


def heldout_windows(loaded: LoadedModel, cfg: QuantBenchConfig) -> dict[str, list[list[int]]]:
    tok = loaded.tokenizer
    texts = corpus_texts("eval", cfg.chat_texts)
    return {domain: token_windows([tok.encode(t) for t in domain_texts], cfg.window, tok.token_id(tok.eos_token))
            for domain, domain_texts in texts.items()}


def measure_variant(name: str, loaded: LoadedModel, windows: dict[str, list[list[int]]],
                    cfg: QuantBenchConfig) -> dict:
    scores = {domain: next_token_nll(loaded.model, w) for domain, w in
              tqdm(windows.items(), desc=f"bench quant: {name} perplexity", unit="domain", leave=False)}
    scores["all"] = (sum(nll for nll, _ in scores.values()), sum(n for _, n in scores.values()))
    ppl = {domain: math.exp(nll / count) for domain, (nll, count) in scores.items()}
    prompts = [loaded.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in BENCH_PROMPTS]
    speed = measure(engine_runner(loaded), prompts, cfg.new_tokens, cfg.repeats, name)
    return {"perplexity": {k: round(v, 4) for k, v in ppl.items()},
            "expert_bytes": expert_weight_bytes(loaded.model)["stored"],
            "decode": speed}


def run_quant_bench(cfg: QuantBenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    original = load_model(cfg.model, dequantize=True)
    windows = heldout_windows(original, cfg)
    variants = {"original": original}
    rtn = LoadedModel(original.config, quantize_experts(copy.deepcopy(original.model), cfg.scale_rule),
                      original.tokenizer, original.source)
    variants[f"mxfp4_rtn_{cfg.scale_rule}"] = rtn
    # GPTQ on calibration text of the training splits (quant/gptq.py)
    variants[f"mxfp4_gptq_{cfg.scale_rule}"] = LoadedModel(
        original.config, gptq_mxfp4_copy(original, cfg.scale_rule), original.tokenizer, original.source)
    if cfg.qat:
        variants["mxfp4_qat"] = load_model(cfg.qat)

    sizes = expert_weight_bytes(original.model)
    packed_bytes = expert_weight_bytes(rtn.model)["stored"]
    # 16 code bytes + 1 scale byte per 32 weights against 2 bytes per bf16 weight: exactly 17/64 = 4.25/16.
    exact = packed_bytes * 16 == sizes["bf16"] * BITS_PER_WEIGHT
    report = {
        "bench": "quant", "machine": describe_machine(), "model": original.source, "qat": cfg.qat,
        "scale_rule": cfg.scale_rule,
        "packed_matmul": "cpu_gemm (compiled)" if cpu_kernel() else "reference (dequantize, then matmul)",
        "heldout": {domain: {"windows": len(w), "tokens_scored": sum(len(x) - 1 for x in w)}
                    for domain, w in windows.items()},
        "heldout_sources": {"chat": f"ShareGPT eval split, first {cfg.chat_texts} turns",
                            "code": "HumanEval tasks 120-163, prompt + canonical_solution"},
        "expert_weights": {"elements": sizes["elements"], "bytes_bf16": sizes["bf16"],
                           "bytes_original_in_memory": sizes["stored"], "bytes_mxfp4": packed_bytes,
                           "mxfp4_over_bf16": packed_bytes / sizes["bf16"], "exactly_4.25_over_16": exact},
        "variants": {},
    }
    for name, loaded in variants.items():
        report["variants"][name] = measure_variant(name, loaded, windows, cfg)
    return report


def format_table(report: dict) -> str:
    domains = list(report["heldout"]) + ["all"]
    lines = ["| variant | " + " | ".join(f"ppl {d}" for d in domains) + " | expert bytes | decode tok/s (median) |",
             "|---" * (len(domains) + 3) + "|"]
    for name, v in report["variants"].items():
        ppl = " | ".join(str(v["perplexity"][d]) for d in domains)
        lines.append(f"| {name} | {ppl} | {v['expert_bytes']} | {v['decode']['tokens_per_s']} |")
    e = report["expert_weights"]
    lines.append(f"\nexpert weights: {e['elements']} elements, bf16 {e['bytes_bf16']} B, "
                 f"MXFP4 {e['bytes_mxfp4']} B ({e['mxfp4_over_bf16']:.6f} = 4.25/16); "
                 f"packed matmul: {report['packed_matmul']}")
    return "\n".join(lines)
