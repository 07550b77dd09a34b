"""`ultraspeed` command line. Each subcommand parses its flags here and calls into the package.

Errors a user can cause end as one line on stderr (`ultraspeed: error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from ultraspeed.errors import UltraSpeedError


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible outputs)")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from ultraspeed.engine.generate import GenerationStats, generate_plain
    from ultraspeed.engine.sampler import SamplingParams
    from ultraspeed.drafters import drafter_for
    from ultraspeed.engine.text_stream import TextStream
    from ultraspeed.loader import load_model

    torch.set_num_threads(args.threads) if args.threads else None
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=tuple(args.stop or ()))
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    prompt_ids = tok.encode(args.prompt) if args.raw else tok.encode_chat([{"role": "user", "content": args.prompt}])
    stats = GenerationStats()
    stream = TextStream(tok, params.stop)
    drafter_path = None if args.no_spec else drafter_for(args.model, args.drafter)
    if drafter_path is not None:
        from ultraspeed.engine.speculative import generate_speculative
        from ultraspeed.models.dflash import load_drafter
        drafter = load_drafter(drafter_path)
        if args.block_size:
            from ultraspeed.bench.acceptance import with_block_size
            drafter = with_block_size(drafter, args.block_size)
        tokens = generate_speculative(loaded.model, drafter, prompt_ids, params, tok.stop_token_ids, stats=stats)
    else:
        tokens = generate_plain(loaded.model, prompt_ids, params, tok.stop_token_ids, stats=stats)
    for new_ids in tokens:
        sys.stdout.write(stream.feed(new_ids))
        sys.stdout.flush()
        if stream.stopped:
            stats.finish_reason = "stop"
            break
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    record = {**stats.as_dict(), "model": loaded.source, "speculative": drafter_path is not None,
              "drafter": str(drafter_path) if drafter_path else None}
    print(json.dumps(record), file=sys.stderr)
    return 0


def cmd_train_drafter(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from ultraspeed.loader import load_model
    from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_from_target, init_random, load_drafter
    from ultraspeed.train.distill_data import DistillSpec, build_or_load
    from ultraspeed.train.drafter import TrainConfig, train

    torch.manual_seed(args.seed)
    loaded = load_model(args.model)
    out = Path(args.out)
    existing = out / "drafter.safetensors"
    if existing.exists() and (out / "checkpoint.pt").exists():
        drafter = load_drafter(existing).requires_grad_(True)      # resume keeps the recorded config
    else:
        config = DFlashConfig.for_target(loaded.config, num_layers=args.layers, num_features=args.features,
                                         block_size=args.block_size, window=args.window)
        drafter = DFlashDrafter(config)
        init_random(drafter, args.seed)
        init_from_target(drafter, loaded.model)
    counts = tuple((d, n) for d, n in zip(("code", "math", "chat", "agent"), args.prompts))
    spec = DistillSpec(counts=counts, max_new_tokens=args.max_new_tokens,
                       target_layer_ids=drafter.config.target_layer_ids, model=str(args.model))
    data = build_or_load(loaded, spec, Path(args.data_dir), batch=args.gen_batch)
    print(f"distill data: {len(data)} sequences, {int(data.offsets[-1])} tokens", file=sys.stderr)
    cfg = TrainConfig(steps=args.steps, seqs_per_step=args.seqs_per_step, anchors_per_seq=args.anchors,
                      seed=args.seed, checkpoint_every=args.checkpoint_every)
    train(drafter, loaded.model, data, cfg, out, log=lambda m: print(m, file=sys.stderr))
    print(f"drafter written to {out / 'drafter.safetensors'}", file=sys.stderr)
    return 0


def emit_report(report: dict, args: argparse.Namespace, table: str) -> None:
    """--json prints the machine-readable report; otherwise a table. --out also saves the JSON."""
    if args.out:
        from pathlib import Path
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else table)


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from ultraspeed.bench.speed import SpeedConfig, format_table, run_speed_bench
    peers = () if args.no_peers else tuple(args.peers)
    cfg = SpeedConfig(model=args.model, new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads,
                      peers=peers, drafter=args.drafter)
    report = run_speed_bench(cfg)
    emit_report(report, args, format_table(report))
    return 0


def cmd_bench_acceptance(args: argparse.Namespace) -> int:
    from ultraspeed.bench.acceptance import AcceptanceConfig, format_table, run_acceptance_bench
    from ultraspeed.drafters import drafter_for
    from ultraspeed.loader import load_model
    from ultraspeed.models.dflash import load_drafter
    path = drafter_for(args.model, args.drafter)
    if path is None:
        raise UltraSpeedError("no drafter: pass --drafter PATH (only the default model ships with one)")
    cfg = AcceptanceConfig(domains=tuple(args.domains), block_sizes=tuple(args.block_sizes),
                           prompts_per_domain=args.prompts, max_tokens=args.max_tokens, threads=args.threads)
    report = run_acceptance_bench(load_model(args.model), load_drafter(path), cfg)
    report["drafter_path"] = str(path)
    emit_report(report, args, format_table(report))
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    from ultraspeed.bench.cost import Task, Tier, compare, format_report, speeds_from_bench
    speeds = {"standard": args.standard_speed, "ultraspeed": args.ultraspeed_speed}
    if args.from_bench:
        speeds = {**speeds_from_bench(args.from_bench), **{k: v for k, v in speeds.items() if v}}
    if not speeds["standard"] or not speeds["ultraspeed"]:
        raise UltraSpeedError("give --standard-speed and --ultraspeed-speed (tok/s) or --from-bench REPORT.json")
    tiers = [Tier("standard", speeds["standard"], 1.0, args.ttft, args.standard_retry_rate),
             Tier("ultraspeed", speeds["ultraspeed"], args.multiplier, args.ttft, args.ultraspeed_retry_rate)]
    task = Task(args.output_tokens, args.prompt_tokens, args.price_in, args.price_out, args.value_of_time)
    report = compare(tiers, task)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default")
    p.add_argument("--json", action="store_true", help="print the machine-readable JSON report")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every system (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the prompt set; medians are reported")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultraspeed", description="Fast MoE inference: MXFP4 experts, "
                                     "DFlash speculative decoding, OpenAI-compatible serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion for one prompt to stdout; JSON stats to stderr")
    g.add_argument("prompt")
    g.add_argument("--model", default="default",
                   help="a Hugging Face model directory, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    g.add_argument("--no-spec", action="store_true", help="plain decoding, no speculative drafter")
    g.add_argument("--drafter", default=None, help="DFlash drafter .safetensors (default model: the shipped one)")
    g.add_argument("--block-size", type=int, default=0, help="draft block length (default: the drafter's own)")
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    add_sampling_flags(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train-drafter", help="self-distill data from the target, then train a DFlash drafter")
    t.add_argument("--model", default="default", help="target model (directory, .gguf or 'default')")
    t.add_argument("--out", default="runs/drafter", help="checkpoints and drafter.safetensors (resumable)")
    t.add_argument("--data-dir", default="runs/distill", help="cache of generated sequences and features")
    t.add_argument("--prompts", type=int, nargs=4, default=[120, 200, 300, 120], metavar=("CODE", "MATH", "CHAT", "AGENT"),
                   help="training prompts per domain (default 120 200 300 120)")
    t.add_argument("--max-new-tokens", type=int, default=192, help="target response length for distillation")
    t.add_argument("--gen-batch", type=int, default=16, help="sequences generated at once")
    t.add_argument("--layers", type=int, default=2, help="draft transformer layers")
    t.add_argument("--features", type=int, default=5, help="target layers whose outputs feed the drafter")
    t.add_argument("--block-size", type=int, default=16)
    t.add_argument("--window", type=int, default=None, help="sliding window over context (default: full)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--seqs-per-step", type=int, default=4)
    t.add_argument("--anchors", type=int, default=24, help="random anchor blocks per sequence")
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train_drafter)

    bench = sub.add_parser("bench", help="benchmarks (machine-readable with --json)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bs = bench_sub.add_parser("speed", help="greedy decode tok/s: ours vs HF transformers vs llama.cpp")
    add_bench_flags(bs)
    bs.add_argument("--new-tokens", type=int, default=128)
    bs.add_argument("--peers", nargs="*", default=["hf_transformers", "llama_cpp"])
    bs.add_argument("--no-peers", action="store_true", help="measure our engine only")
    bs.add_argument("--drafter", default=None, help="also measure DFlash with this drafter")
    bs.set_defaults(func=cmd_bench_speed)
    ba = bench_sub.add_parser("acceptance", help="DFlash accepted length and speed-up per domain and block size")
    add_bench_flags(ba)
    ba.add_argument("--drafter", default=None)
    ba.add_argument("--domains", nargs="+", default=["code", "math", "chat", "agent"])
    ba.add_argument("--block-sizes", type=int, nargs="+", default=[8, 16])
    ba.add_argument("--prompts", type=int, default=4, help="held-out prompts per domain")
    ba.add_argument("--max-tokens", type=int, default=128)
    ba.set_defaults(func=cmd_bench_acceptance)

    c = sub.add_parser("cost", help="effective cost and time per completed task, standard vs ultraspeed tier")
    c.add_argument("--output-tokens", type=int, default=2000, help="output tokens per task (default 2000)")
    c.add_argument("--prompt-tokens", type=int, default=1000)
    c.add_argument("--standard-speed", type=float, default=None, help="tok/s of the standard tier")
    c.add_argument("--ultraspeed-speed", type=float, default=None, help="tok/s of the ultraspeed tier")
    c.add_argument("--from-bench", default=None, help="read both speeds from a bench speed/acceptance JSON")
    c.add_argument("--multiplier", type=float, default=3.0, help="ultraspeed price multiplier (default 3)")
    c.add_argument("--price-in", type=float, default=0.5, help="USD per million input tokens at 1x")
    c.add_argument("--price-out", type=float, default=2.0, help="USD per million output tokens at 1x")
    c.add_argument("--ttft", type=float, default=0.5, help="seconds to first token (both tiers)")
    c.add_argument("--standard-retry-rate", type=float, default=0.0, help="probability an attempt times out")
    c.add_argument("--ultraspeed-retry-rate", type=float, default=0.0)
    c.add_argument("--value-of-time", type=float, default=0.0, help="USD per hour of waiting")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_cost)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UltraSpeedError as e:
        print(f"ultraspeed: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # invalid parameter values (sampling params, shapes)
        print(f"ultraspeed: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
