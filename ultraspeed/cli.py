"""`ultraspeed` command line. Each subcommand parses its flags here and calls into the package.

Errors a user can cause end as one line on stderr (`ultraspeed: error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import TYPE_CHECKING

from ultraspeed.errors import UltraSpeedError

if TYPE_CHECKING:
    from ultraspeed.loader import LoadedModel
    from ultraspeed.parallel import DistEnv
    from ultraspeed.train.drafter import TrainConfig


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=SIZE, default=256, help="new tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=NONNEGATIVE, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=1.0)
    p.add_argument("--top-k", type=COUNT, default=0, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible outputs)")


def min_accepted_arg(text: str) -> float | None:
    """--min-accepted: a number of tokens per step, or 'auto' (None: the measured break-even)."""
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', not {text!r}") from None


def int_at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an integer >= minimum (and <= maximum): counts, sizes, intervals, where 0 or negative
    values would hang, divide by zero or act as Python slices further down."""
    wanted = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {wanted}, not {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected an integer {wanted}, not {value}")
        return value
    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite number >= low (> low with low_open) and <= high; refuses nan and inf."""
    wanted = (f"> {low:g}" if low_open else f">= {low:g}") + ("" if high == math.inf else f" and <= {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {wanted}, not {text!r}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"expected a finite number {wanted}, not {text}")
        return value
    return parse


COUNT, SIZE = int_at_least(0), int_at_least(1)
NONNEGATIVE, positive_float = float_in(0.0), float_in(0.0, low_open=True)


def share_arg(text: str) -> float:
    """A fraction strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, not {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (exclusive), not {value}")
    return value


def writable_output(path: str, directory: bool = False):
    """Check an output location before the work that fills it (minutes to hours): create its directory now, and
    refuse one that cannot be written, instead of losing the result at the end."""
    from pathlib import Path
    out = Path(path)
    folder = out if directory else out.parent
    if directory and out.exists() and not out.is_dir():
        raise UltraSpeedError(f"{out}: exists and is not a directory")
    if not directory and out.is_dir():
        raise UltraSpeedError(f"{out}: is a directory; give a file name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UltraSpeedError(f"{folder}: cannot create the output directory ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):
        raise UltraSpeedError(f"{folder}: not writable")
    return out


def min_accepted_for(args: argparse.Namespace, adaptive: bool) -> float | None:
    """'auto' needs step costs, which only adaptive verification measures; whole blocks keep a fixed rule."""
    from ultraspeed.engine.speculative import served_min_accepted
    return served_min_accepted(adaptive) if args.min_accepted is None else args.min_accepted


def block_size_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value == 1 or value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (auto) or a block length of at least 2, not {text!r}")
    return value


def add_block_size_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block-size", type=block_size_arg, default=0,
                   help="draft block length; 0 (default) = auto: 8 on a CPU, where few drafts are worth verifying "
                        "and a shorter block drafts faster, the drafter's own block elsewhere")


def served_block(drafter, requested: int, target):
    """The drafter drafting the block length `--block-size` asks for (see serving_block_size)."""
    from ultraspeed.engine.verify_length import serving_block_size
    from ultraspeed.models.dflash import with_block_size
    device = target.embed_tokens.weight.device
    return with_block_size(drafter, serving_block_size(drafter.config.block_size, requested, device))


def add_verify_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify", choices=["adaptive", "full"], default="adaptive",
                   help="adaptive (default): verify only the drafts worth their time, from step costs timed at "
                        "start-up (a CPU verifies fewer, a GPU whole blocks); full: always the whole block. "
                        "The output is the same")


def add_lookup_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-lookup", action="store_true",
                   help="draft with the DFlash drafter only; by default a sequence whose last tokens occurred "
                        "earlier in its context drafts what followed them there (prompt lookup), which code, "
                        "quotes and tool calls repeat often. The output is the same")
    p.add_argument("--lookup-corpus", default="auto", metavar="auto|none|FILE",
                   help="where the context has no match, draft from this corpus of the target's own earlier "
                        "answers (`ultraspeed build-lookup-corpus`); auto (default): the shipped one for the "
                        "default model, none elsewhere. The output is the same")


def as_str(path) -> str | None:
    return None if path is None else str(path)


def lookup_corpus_arg(args: argparse.Namespace):
    """The LookupCorpus `--lookup-corpus` names (None with --no-lookup, 'none' or no shipped one)."""
    from ultraspeed.drafters import lookup_corpus_for
    from ultraspeed.engine.lookup_corpus import LookupCorpus
    path = None if args.no_lookup else lookup_corpus_for(args.model, args.lookup_corpus)
    return LookupCorpus.load(path) if path is not None else None


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: attention heads and dense MLPs split "
                   "over them (launch with torchrun; docs/parallelism.md)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks: MoE experts split over them "
                   "(launch with torchrun; same size as --tp when both are given)")


def pick_device(requested: str):
    """--device: auto = the GPU where one is visible, else the CPU."""
    import torch
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UltraSpeedError("--device cuda: no CUDA device is visible")
    return torch.device(requested)


def load_on_device(model: str, device: str, sharded: bool) -> LoadedModel:
    """Load `model` for `--device` (sharded ranks: on the CPU, each rank then moves its part to its own device):
    bf16 on a GPU (half the bytes per step), fp32 on the CPU (where int8 matmuls are swapped in afterwards)."""
    import torch
    from ultraspeed.loader import load_model
    target = torch.device("cpu") if sharded else pick_device(device)
    loaded = load_model(model, dtype=torch.bfloat16 if target.type == "cuda" else torch.float32)
    loaded.model.to(target)
    return loaded


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default): the GPU where one is visible (bf16 weights), else the CPU (fp32/int8); "
                        "with --tp/--ep each rank takes its own")


def add_runtime_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=["auto", "dynamic", "static"], default="auto",
                   help="static: preallocated decode steps, captured as CUDA graphs on a GPU and replayed every "
                        "step (whole blocks, lookup drafts, greedy or sampled inside the graph); dynamic: the "
                        "engine that verifies only the drafts worth their time; auto (default): static on one "
                        "GPU, dynamic elsewhere")


def pick_runtime(requested: str, device, sharded: bool) -> str:
    """--runtime: auto = the static, graph-captured step on one GPU, the dynamic engine elsewhere (it verifies
    adaptively and gives up on a drafter that does not pay: what a CPU needs, and it gains nothing from capture)."""
    if requested == "auto":
        return "static" if device.type == "cuda" and not sharded else "dynamic"
    return requested


def refuse_static_sharding(args: argparse.Namespace) -> None:
    if args.runtime == "static" and (args.tp > 1 or args.ep > 1):
        raise UltraSpeedError("--runtime static runs on one device: drop --tp and --ep")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from ultraspeed.parallel import ParallelPlan, shard_for_this_rank, shutdown

    torch.set_num_threads(args.threads) if args.threads else None
    ParallelPlan(args.tp, args.ep)             # refuse impossible flags before the (long) load
    refuse_static_sharding(args)
    corpus = lookup_corpus_arg(args)           # a bad file fails here, before the (long) model load
    loaded = load_on_device(args.model, args.device, args.tp > 1 or args.ep > 1)
    # Under torchrun every rank runs the same loop in lockstep; rank 0 alone writes the stream and the stats.
    env = shard_for_this_rank(loaded.model, args.tp, args.ep)
    try:
        return _generate(args, loaded, env, corpus)
    finally:
        shutdown(env)


def _generate(args: argparse.Namespace, loaded: LoadedModel, env: DistEnv | None, corpus) -> int:
    if corpus is not None:
        corpus.check_vocab(loaded.config.vocab_size)
    from ultraspeed.engine.generate import GenerationStats, generate_plain
    from ultraspeed.engine.sampler import SamplingParams
    from ultraspeed.drafters import drafter_for
    from ultraspeed.engine.text_stream import TextStream
    from ultraspeed.parallel import shared_seed
    from ultraspeed.quant.int8 import apply_weight_format, match_drafter_weights

    seed = args.seed if env is None else shared_seed(args.seed, env)   # ranks must draw the same samples
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=seed, stop=tuple(s for s in args.stop or () if s))
    out = sys.stdout if env is None or env.is_main else None
    weights = "checkpoint"
    if env is None:                      # sharded models keep their checkpoint precision
        weights = apply_weight_format(loaded.model, args.weights)
    tok = loaded.tokenizer
    prompt_ids = tok.encode(args.prompt) if args.raw else tok.encode_chat([{"role": "user", "content": args.prompt}])
    stats = GenerationStats()
    stream = TextStream(tok, params.stop)
    drafter_path = None if args.no_spec else drafter_for(args.model, args.drafter)
    device = loaded.model.embed_tokens.weight.device
    runtime = pick_runtime(args.runtime, device, env is not None)
    drafter = None
    if drafter_path is not None:
        from ultraspeed.models.dflash import load_drafter
        drafter = load_drafter(drafter_path, loaded.model.dtype, loaded.config)
        match_drafter_weights(drafter, weights, loaded.model)
        drafter.to(device)             # sharded: replicated, every rank drafts the same block
        drafter = served_block(drafter, args.block_size, loaded.model)
    if runtime == "static":
        from ultraspeed.runtime.loop import generate_static
        tokens = generate_static(loaded.model, prompt_ids, params, tok.stop_token_ids, drafter, stats,
                                 lookup=not args.no_lookup, corpus=corpus)
    elif drafter is not None:
        from ultraspeed.engine.speculative import generate_speculative
        from ultraspeed.engine.verify_length import measure_step_cost
        # Sharded ranks time differently and would choose different verify lengths: they verify whole blocks.
        step_cost = measure_step_cost(loaded.model, drafter) if args.verify == "adaptive" and env is None else None
        tokens = generate_speculative(loaded.model, drafter, prompt_ids, params, tok.stop_token_ids, stats=stats,
                                      min_accepted=min_accepted_for(args, step_cost is not None),
                                      step_cost=step_cost, lookup=not args.no_lookup, corpus=corpus)
    else:
        tokens = generate_plain(loaded.model, prompt_ids, params, tok.stop_token_ids, stats=stats)
    for new_ids in tokens:
        text = stream.feed(new_ids)          # every rank feeds the stream: a stop string ends all ranks alike
        if out is not None:
            out.write(text)
            out.flush()
        if stream.stopped:
            stats.finish_reason = "stop"
            break
    if out is None:
        return 0
    out.write(stream.flush() + "\n")
    out.flush()
    record = {**stats.as_dict(), "model": loaded.source, "weights": weights, "speculative": drafter_path is not None,
              "drafter": str(drafter_path) if drafter_path else None, "device": str(device), "runtime": runtime}
    if env is not None:
        record.update(tp=args.tp, ep=args.ep, world_size=env.world_size)
    print(json.dumps(record), file=sys.stderr)
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    from ultraspeed.train.drafter import TrainConfig  # torch is imported only by the commands that need it

    base = TrainConfig()
    return TrainConfig(steps=args.steps, seqs_per_step=args.seqs_per_step, anchors_per_seq=args.anchors,
                       lr_muon=base.lr_muon * args.lr_scale, lr_adam=base.lr_adam * args.lr_scale,
                       seed=args.seed, checkpoint_every=args.checkpoint_every)


def locked_to_out(check_flags=lambda args: None):
    """A training command that resumes from its --out, held to one run per --out (train/run_lock.py), once
    `check_flags` has passed (a refused flag leaves nothing behind)."""
    def wrap(run):
        def command(args: argparse.Namespace) -> int:
            from pathlib import Path
            from ultraspeed.train.run_lock import exclusive_run
            check_flags(args)
            writable_output(args.out, directory=True)
            with exclusive_run(Path(args.out)):
                return run(args)
        return command
    return wrap


def check_corpus_share(args: argparse.Namespace) -> None:
    if args.corpus_share is not None and not (args.corpus_chat or args.corpus_code):
        raise UltraSpeedError("--corpus-share needs teacher-forced text: give --corpus-chat and/or --corpus-code")


@locked_to_out(check_corpus_share)
def cmd_train_drafter(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from ultraspeed.loader import load_model
    from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_from_target, init_random, load_drafter
    from ultraspeed.quant.int8 import apply_weight_format
    from ultraspeed.train.corpus_data import CorpusSpec, build_or_load_corpus
    from ultraspeed.train.distill_data import DataMix, DistillSpec, build_or_load
    from ultraspeed.train.drafter import frequent_tokens, train

    torch.manual_seed(args.seed)
    writable_output(args.data_dir, directory=True)  # before distilling (--out: checked by locked_to_out)
    loaded = load_model(args.model)
    out = Path(args.out)
    existing = out / "drafter.safetensors"
    if existing.exists() and (out / "checkpoint.pt").exists():
        drafter = load_drafter(existing, target=loaded.config).requires_grad_(True)   # resume: its recorded config
    elif args.init_from:
        # Fine-tune a trained drafter (e.g. the shipped one on more data): its file's config wins over the
        # architecture flags; the draft vocabulary is re-ranked on the new data below (the head is the target's).
        drafter = load_drafter(args.init_from, target=loaded.config).requires_grad_(True)
        print(f"starting from {args.init_from} (its architecture: {drafter.config.num_layers} layers, block "
              f"{drafter.config.block_size})", file=sys.stderr)
    else:
        if args.features > loaded.config.num_layers:
            raise UltraSpeedError(f"--features {args.features}: the target has only {loaded.config.num_layers} layers")
        config = DFlashConfig.for_target(loaded.config, num_layers=args.layers, num_features=args.features,
                                         block_size=args.block_size, window=args.window,
                                         draft_vocab_size=min(args.draft_vocab, loaded.config.vocab_size))
        drafter = DFlashDrafter(config)
        init_random(drafter, args.seed)
        init_from_target(drafter, loaded.model)     # before the swap below: it copies the target's dense weights
    # Distil from the target exactly as it will be served (int8 on a CPU by default): the drafter then learns
    # the served model's tokens and features, not those of a precision nobody decodes with.
    weights = apply_weight_format(loaded.model, args.weights)
    counts = tuple((d, n) for d, n in zip(("code", "math", "chat", "agent"), args.prompts))
    spec = DistillSpec(counts=counts, max_new_tokens=args.max_new_tokens,
                       target_layer_ids=drafter.config.target_layer_ids, model=str(args.model), weights=weights)
    data = build_or_load(loaded, spec, Path(args.data_dir), batch=args.gen_batch)
    if args.corpus_chat or args.corpus_code:
        corpus = build_or_load_corpus(loaded, CorpusSpec(chat=args.corpus_chat, code=args.corpus_code,
                                                         target_layer_ids=drafter.config.target_layer_ids,
                                                         model=str(args.model), weights=weights),
                                      Path(args.corpus_dir))
        print(f"teacher-forced text: {len(corpus)} sequences, {corpus.num_tokens} tokens", file=sys.stderr)
        data = DataMix([data, corpus], None if args.corpus_share is None else [1 - args.corpus_share, args.corpus_share])
    if drafter.draft_vocab is not None and not (out / "checkpoint.pt").exists():
        drafter.draft_vocab = frequent_tokens([data.sequence_labels(i) for i in range(len(data))],
                                              drafter.config.draft_vocab_size, loaded.tokenizer.stop_token_ids)
    print(f"drafter data: {len(data)} sequences, {data.num_tokens} tokens", file=sys.stderr)
    train(drafter, loaded.model, data, train_config(args), out, log=lambda m: print(m, file=sys.stderr))
    print(f"drafter written to {out / 'drafter.safetensors'}", file=sys.stderr)
    return 0


def cmd_build_lookup_corpus(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from ultraspeed.loader import load_model
    from ultraspeed.quant.int8 import apply_weight_format
    from ultraspeed.train.lookup_corpus_data import build_lookup_corpus
    from ultraspeed.train.prompts import DOMAINS

    out = Path(args.out)
    if out.suffix != ".npz":
        raise UltraSpeedError(f"--out must name a .npz file, not {out}")
    if not any(args.prompts):
        raise UltraSpeedError("--prompts asks for no prompt at all (CODE MATH CHAT AGENT counts)")
    writable_output(args.out)
    torch.set_num_threads(args.threads) if args.threads else None
    loaded = load_model(args.model)
    weights = apply_weight_format(loaded.model, args.weights)   # answer as served: these are the tokens to draft
    corpus = build_lookup_corpus(loaded, dict(zip(DOMAINS, args.prompts)), args.max_new_tokens, args.batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus.save(out)
    print(json.dumps({"out": str(out), "sequences": corpus.num_sequences, "tokens": int(len(corpus.tokens)),
                      "ngrams": int(len(corpus.keys)), "weights": weights, "bytes": out.stat().st_size}))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from ultraspeed.loader import load_model, resolve_model_path
    from ultraspeed.quant.apply import expert_weight_bytes, quantize_experts
    from ultraspeed.quant.checkpoint import check_checkpoint_output, quantization_config, save_mxfp4_checkpoint

    check_checkpoint_output(args.output, resolve_model_path(args.input))   # before the load, not after the work
    writable_output(args.output, directory=True)
    loaded = load_model(args.input, dequantize=True)    # a packed input is re-packed from its decoded weights
    before = expert_weight_bytes(loaded.model)
    if args.rounding == "gptq":
        from ultraspeed.quant.gptq import gptq_on_calibration_text
        gptq_on_calibration_text(loaded.model, loaded.tokenizer, args.scale_rule)
    quantize_experts(loaded.model, args.scale_rule)
    out = save_mxfp4_checkpoint(loaded, args.output, quantization_config(args.scale_rule, rounding=args.rounding))
    after = expert_weight_bytes(loaded.model)
    print(json.dumps({"output": str(out), "format": args.format, "scale_rule": args.scale_rule,
                      "rounding": args.rounding,
                      "expert_weights": before["elements"], "expert_bytes_bf16": before["bf16"],
                      "expert_bytes_mxfp4": after["stored"], "ratio": after["stored"] / before["bf16"]}),
          file=sys.stderr)
    return 0


@locked_to_out()
def cmd_qat(args: argparse.Namespace) -> int:
    import copy
    from pathlib import Path

    import torch
    from ultraspeed.loader import load_model
    from ultraspeed.quant.checkpoint import check_checkpoint_output, quantization_config, save_mxfp4_checkpoint
    from ultraspeed.train.qat import QATConfig, export_qat, train_qat
    from ultraspeed.train.text_corpus import corpus_texts, token_windows

    check_checkpoint_output(args.out)           # its training state and the exported checkpoint live there
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads) if args.threads else None
    loaded = load_model(args.model, dequantize=True)
    teacher = copy.deepcopy(loaded.model)
    tok = loaded.tokenizer
    texts = corpus_texts("train", args.chat_texts)
    windows = token_windows([tok.encode(t) for domain in texts.values() for t in domain], args.seq_len,
                            tok.token_id(tok.eos_token))
    print(f"qat data: {len(windows)} windows of {args.seq_len} tokens "
          f"({len(texts['chat'])} ShareGPT turns, {len(texts['code'])} HumanEval solutions)", file=sys.stderr)
    cfg = QATConfig(steps=args.steps, lr=args.lr, seq_len=args.seq_len, seqs_per_step=args.seqs_per_step,
                    scale_rule=args.scale_rule, checkpoint_every=args.checkpoint_every, seed=args.seed,
                    source=str(Path(loaded.source).resolve()))
    out = Path(args.out)
    train_qat(loaded.model, teacher, windows, cfg, out, log=lambda m: print(m, file=sys.stderr))
    export_qat(loaded.model, cfg.scale_rule)
    save_mxfp4_checkpoint(loaded, out, quantization_config(cfg.scale_rule, qat={
        "steps": cfg.steps, "lr": cfg.lr, "seq_len": cfg.seq_len, "seqs_per_step": cfg.seqs_per_step,
        "loss": "KL(original || fake-quant student)", "trained": "expert weights only"}))
    print(f"MXFP4 QAT checkpoint written to {out}", file=sys.stderr)
    return 0


def emit_report(report: dict, args: argparse.Namespace, table: str) -> None:
    """--json prints the machine-readable report; otherwise a table. --out also saves the JSON (checked to be
    writable before the bench ran: check_report_out)."""
    print(json.dumps(report, indent=2) if args.json else table)
    if args.out:
        from pathlib import Path
        Path(args.out).write_text(json.dumps(report, indent=2))


def check_report_out(args: argparse.Namespace) -> None:
    if args.out:
        writable_output(args.out)


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from ultraspeed.bench.speed import SpeedConfig, format_table, run_speed_bench
    check_report_out(args)
    peers = () if args.no_peers else tuple(args.peers)
    cfg = SpeedConfig(model=args.model, new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads,
                      peers=peers, drafter=args.drafter)
    report = run_speed_bench(cfg)
    emit_report(report, args, format_table(report))
    return 0


def cmd_bench_acceptance(args: argparse.Namespace) -> int:
    from ultraspeed.bench.acceptance import AcceptanceConfig, format_table, run_acceptance_bench
    from ultraspeed.drafters import drafter_for, lookup_corpus_for
    from ultraspeed.loader import load_model
    from ultraspeed.models.dflash import load_drafter
    path = drafter_for(args.model, args.drafter)
    if path is None:
        raise UltraSpeedError("no drafter: pass --drafter PATH (only the default model ships with one)")
    check_report_out(args)
    cfg = AcceptanceConfig(domains=tuple(args.domains), block_sizes=tuple(args.block_sizes),
                           prompts_per_domain=args.prompts, max_tokens=args.max_tokens, threads=args.threads,
                           weights=args.weights, split=args.split, adaptive=args.verify == "adaptive",
                           lookup=not args.no_lookup, lookup_corpus=as_str(lookup_corpus_for(args.model, args.lookup_corpus)))
    loaded = load_model(args.model)
    report = run_acceptance_bench(loaded, load_drafter(path, target=loaded.config), cfg)
    report["drafter_path"] = str(path)
    emit_report(report, args, format_table(report))
    return 0


def cmd_bench_report(args: argparse.Namespace) -> int:
    from pathlib import Path
    from ultraspeed.bench.report import ReportConfig, failed_systems, quick, run_report
    from ultraspeed.drafters import lookup_corpus_for
    writable_output(args.out_dir, directory=True)
    cfg = ReportConfig(model=args.model, drafter=args.drafter, systems=tuple(args.systems),
                       domains=tuple(args.domains), prompts_per_domain=args.prompts, new_tokens=args.new_tokens,
                       repeats=args.repeats, block_sizes=tuple(args.block_sizes), threads=args.threads,
                       verify=args.verify, lookup=not args.no_lookup, rounding=args.rounding,
                       lookup_corpus=as_str(lookup_corpus_for(args.model, args.lookup_corpus)))
    report = run_report(quick(cfg) if args.quick else cfg, Path(args.out_dir))
    print(json.dumps(report, indent=2) if args.json else (Path(args.out_dir) / "report.md").read_text())
    failed = failed_systems(report)
    if failed:
        print(f"ultraspeed: bench report: failed systems: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_cost(args: argparse.Namespace) -> int:
    from ultraspeed.bench.cost import Task, Tier, compare, format_report, speeds_from_bench
    given = {"standard": args.standard_speed, "ultraspeed": args.ultraspeed_speed}
    speeds = speeds_from_bench(args.from_bench) if args.from_bench else {}
    speeds.update({tier: speed for tier, speed in given.items() if speed is not None})   # flags win
    missing = [tier for tier in given if tier not in speeds]
    if missing:
        where = f"{args.from_bench} has no {' or '.join(missing)} speed: " if args.from_bench else ""
        flags = " and ".join(f"--{tier}-speed" for tier in missing)
        raise UltraSpeedError(f"{where}give {flags} (tok/s), or --from-bench REPORT.json")
    tiers = [Tier("standard", speeds["standard"], 1.0, args.ttft, args.standard_retry_rate),
             Tier("ultraspeed", speeds["ultraspeed"], args.multiplier, args.ttft, args.ultraspeed_retry_rate)]
    task = Task(args.output_tokens, args.prompt_tokens, args.price_in, args.price_out, args.value_of_time)
    report = compare(tiers, task)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_bench_quant(args: argparse.Namespace) -> int:
    from ultraspeed.bench.quant import QuantBenchConfig, format_table, run_quant_bench
    check_report_out(args)
    cfg = QuantBenchConfig(model=args.model, qat=args.qat, scale_rule=args.scale_rule, chat_texts=args.chat_texts,
                           window=args.window, new_tokens=args.new_tokens, repeats=args.repeats,
                           threads=args.threads)
    report = run_quant_bench(cfg)
    emit_report(report, args, format_table(report))
    return 0


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default")
    p.add_argument("--json", action="store_true", help="print the machine-readable JSON report")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--threads", type=SIZE, default=2, help="CPU threads for every system (default 2)")
    p.add_argument("--repeats", type=SIZE, default=3, help="rounds over the prompt set; medians are reported")


def ultraspeed_tier_model(loaded, checkpoint: str | None, rounding: str = "gptq"):
    """The ultraspeed tier's model: `checkpoint` (an MXFP4 checkpoint from `ultraspeed quantize` or `ultraspeed qat`
    of the same model), else a copy of the served model with its experts (a dense model: its MLP) quantized to
    MXFP4, rounded by GPTQ (`rounding` "gptq", quant/gptq.py, cached on disk) or to nearest."""
    import copy
    from ultraspeed.loader import cache_dir, load_model
    from ultraspeed.quant.apply import MXFP4Experts, MXFP4Linear, expert_targets, quantize_experts
    if checkpoint is None:
        gptq = rounding == "gptq"
        how = "GPTQ on calibration text (cached on disk)" if gptq else "round-to-nearest"
        print(f"ultraspeed: the ultraspeed tier quantizes its experts to MXFP4 at start-up by {how}, which costs "
              "quality (default model, perplexity: +15% round-to-nearest, +7% GPTQ, +0.9% after `ultraspeed "
              "qat`); --ultraspeed-model DIR serves a QAT checkpoint", file=sys.stderr)
        if gptq:
            from ultraspeed.quant.gptq import gptq_mxfp4_copy
            return gptq_mxfp4_copy(loaded, "mse", cache_dir() / "gptq")
        return quantize_experts(copy.deepcopy(loaded.model), "mse")
    weight = loaded.model.embed_tokens.weight
    fast = load_model(checkpoint, dtype=weight.dtype).model.to(weight.device)
    a, b = fast.config, loaded.model.config
    if (a.vocab_size, a.hidden_size, a.num_layers) != (b.vocab_size, b.hidden_size, b.num_layers):
        raise UltraSpeedError(f"--ultraspeed-model {checkpoint} is not a quantization of the served model (vocab, "
                              f"hidden, layers: {a.vocab_size}, {a.hidden_size}, {a.num_layers} vs "
                              f"{b.vocab_size}, {b.hidden_size}, {b.num_layers})")
    if not any(isinstance(fast.get_submodule(n), (MXFP4Linear, MXFP4Experts)) for n in expert_targets(fast)):
        raise UltraSpeedError(f"--ultraspeed-model {checkpoint} holds no MXFP4 expert weights "
                              f"(make one with `ultraspeed quantize` or `ultraspeed qat`)")
    return fast


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    from ultraspeed.drafters import drafter_for
    from ultraspeed.models.dflash import load_drafter
    from ultraspeed.quant.int8 import apply_weight_format, match_drafter_weights
    from ultraspeed.server.app import ServerConfig, model_name_from_source, serve
    from ultraspeed.server.billing import Prices
    from ultraspeed.server.limits import LimitsConfig, load_api_keys
    from ultraspeed.server.verifier import VerifierConfig
    from ultraspeed.parallel import ParallelPlan, follow, lead, shard_for_this_rank, shutdown

    # The engines decode on threads of their own, each with its share of the cores. This thread stays on one:
    # libgomp stops spinning between parallel regions once it manages more threads than there are cores, and
    # a team of this thread's (loading would make one) beside an engine's doubled the engine's decode step.
    cores = args.threads or available_cores()
    torch.set_num_threads(1)
    limits = LimitsConfig(api_keys=load_api_keys(args.api_keys_file), max_queued_per_key=args.max_queued_per_key,
                          session_seconds=args.session_minutes * 60,
                          request_seconds=args.request_minutes * 60, idle_seconds=args.idle_minutes * 60)
    ParallelPlan(args.tp, args.ep)             # refuse impossible flags before the (long) load
    refuse_static_sharding(args)
    if args.max_n > args.max_queue:
        raise UltraSpeedError(f"--max-n {args.max_n} exceeds --max-queue {args.max_queue}: the n candidates of one "
                              "call are queued together, so such a call could never be accepted")
    corpus = lookup_corpus_arg(args)
    loaded = load_on_device(args.model, args.device, args.tp > 1 or args.ep > 1)
    env = shard_for_this_rank(loaded.model, args.tp, args.ep)
    if env is not None and not env.is_main:
        follow(loaded.model, env)              # replay rank 0's model calls until its server stops
        shutdown(env)
        return 0
    stop_followers = lead(loaded.model, env) if env is not None else None
    drafter_path = None if args.no_spec else drafter_for(args.model, args.drafter)
    drafter = load_drafter(drafter_path, loaded.model.dtype, loaded.config) if drafter_path else None
    fast = None
    if env is None and args.ultraspeed_experts == "mxfp4":
        # Before the int8 swap changes the modules.
        fast = ultraspeed_tier_model(loaded, args.ultraspeed_model, args.ultraspeed_rounding)
    elif args.ultraspeed_experts == "mxfp4":
        print("ultraspeed: with --tp/--ep the ultraspeed tier serves the original expert weights", file=sys.stderr)
    if env is None:                            # sharded models keep their checkpoint precision
        weights = apply_weight_format(loaded.model, args.weights)
        if fast is not None:
            apply_weight_format(fast, args.weights)
        if drafter is not None:
            match_drafter_weights(drafter, weights, loaded.model)
    if drafter is not None:
        drafter.to(loaded.model.embed_tokens.weight.device)   # sharded: rank 0 only; followers need no drafts
        drafter = served_block(drafter, args.block_size, loaded.model)
    config = ServerConfig(
        model_name=args.served_model_name or model_name_from_source(loaded.source),
        standard_max_running=args.max_concurrent, ultraspeed_max_running=args.ultraspeed_max_concurrent,
        ultraspeed_multiplier=args.ultraspeed_price_multiplier, max_queue=args.max_queue,
        max_len=args.max_context, max_n=args.max_n,
        prices=Prices(args.price_input, args.price_output), limits=limits,
        verifier=VerifierConfig(enabled=args.enable_verifier, timeout_s=args.verifier_timeout),
        drain_seconds=args.drain_seconds, min_accepted=min_accepted_for(args, args.verify == "adaptive"),
        adaptive_verify=args.verify == "adaptive", lookup=not args.no_lookup,
        engine_threads=max(1, cores // (2 if fast is not None else 1)),
        runtime=pick_runtime(args.runtime, loaded.model.embed_tokens.weight.device, env is not None))
    how = ", ".join(["MXFP4 experts" if fast is not None else "original experts",
                     "DFlash speculative" if drafter is not None else "plain decoding (no drafter)"])
    print(f"ultraspeed: serving {config.model_name} and {config.model_name}-ultraspeed ({how}) at "
          f"http://{args.host}:{args.port}; API keys: {len(limits.api_keys) or 'none (open)'}", file=sys.stderr)
    try:
        serve(loaded.model, loaded.tokenizer, drafter, config, args.host, args.port, args.log_level, fast, corpus)
    finally:
        if env is not None:
            stop_followers()
            shutdown(env)
    return 0


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
    add_block_size_flag(g)
    g.add_argument("--min-accepted", type=min_accepted_arg, default="auto",
                   help="after 4 speculative steps, decode plainly if fewer tokens than this are committed per "
                        "step (verification would cost more than it saves; output unchanged). auto (default): "
                        "the break-even of the step costs timed at start-up (2 with --verify full); 0 = never")
    add_verify_flag(g)
    add_lookup_flag(g)
    g.add_argument("--weights", choices=["auto", "fp32", "int8", "q4"], default="auto",
                   help="dense weight format: auto (default) = int8 on a CPU with the compiled kernel; q4 = a "
                        "Q4_1 GGUF's 4-bit matrices kept 4-bit (lossless, less memory, slower here), the rest int8")
    g.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--threads", type=COUNT, default=0, help="CPU threads (default: torch's choice)")
    add_device_flag(g)
    add_runtime_flag(g)
    add_parallel_flags(g)
    add_sampling_flags(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train-drafter", help="self-distill data from the target, then train a DFlash drafter")
    t.add_argument("--model", default="default", help="target model (directory, .gguf or 'default')")
    t.add_argument("--out", default="runs/drafter", help="checkpoints and drafter.safetensors (resumable)")
    t.add_argument("--data-dir", default="runs/distill", help="cache of generated sequences and features")
    t.add_argument("--prompts", type=COUNT, nargs=4, default=[120, 200, 300, 120], metavar=("CODE", "MATH", "CHAT", "AGENT"),
                   help="training prompts per domain (default 120 200 300 120); code past HumanEval's 120 training "
                        "tasks goes on with functions of the Python standard library to complete")
    t.add_argument("--max-new-tokens", type=SIZE, default=192, help="target response length for distillation")
    t.add_argument("--gen-batch", type=SIZE, default=16, help="sequences generated at once")
    t.add_argument("--corpus-chat", type=COUNT, default=0, metavar="N",
                   help="also train on N ShareGPT first exchanges, teacher-forced (the target labels every "
                        "position with its own greedy token; ~10x cheaper per token than generating)")
    t.add_argument("--corpus-code", type=COUNT, default=0, metavar="N",
                   help="... and on N HumanEval training solutions (at most 120)")
    t.add_argument("--corpus-dir", default="runs/corpus", help="cache of the teacher-forced text and features "
                   "(in shards: a larger --corpus-chat reuses what is built; an interrupted build resumes)")
    t.add_argument("--corpus-share", type=share_arg, default=None, metavar="F",
                   help="fraction of each step's sequences drawn from the teacher-forced text, the rest from the "
                        "target's own responses (default: in proportion to their sequence counts)")
    t.add_argument("--layers", type=SIZE, default=2, help="draft transformer layers")
    t.add_argument("--features", type=SIZE, default=5, help="target layers whose outputs feed the drafter")
    t.add_argument("--block-size", type=int_at_least(2), default=16)
    t.add_argument("--window", type=SIZE, default=None, help="sliding window over context (default: full)")
    t.add_argument("--draft-vocab", type=COUNT, default=8192,
                   help="draft among this many most frequent tokens of the data (0 = full vocabulary)")
    t.add_argument("--steps", type=SIZE, default=2000)
    t.add_argument("--seqs-per-step", type=SIZE, default=4)
    t.add_argument("--anchors", type=SIZE, default=24, help="random anchor blocks per sequence")
    t.add_argument("--lr-scale", type=positive_float, default=1.0, metavar="F",
                   help="multiply both peak learning rates (Muon 2e-3, AdamW 3e-3) by F, e.g. below 1 to fine-tune "
                        "with --init-from without first undoing what the drafter knows")
    t.add_argument("--checkpoint-every", type=SIZE, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weights", choices=["auto", "fp32", "int8", "q4"], default="auto",
                   help="target weights while distilling: serve-time format (auto = int8 on CPU)")
    t.add_argument("--init-from", default=None, metavar="DRAFTER",
                   help="start from this trained drafter .safetensors instead of the target's last layers")
    t.set_defaults(func=cmd_train_drafter)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server: standard and ultraspeed tiers, playground at /")
    s.add_argument("--model", default="default", help="target model (directory, .gguf or 'default')")
    s.add_argument("--drafter", default=None, help="DFlash drafter .safetensors for the ultraspeed tier "
                   "(default model: the shipped one; without any, the ultraspeed tier decodes plainly)")
    s.add_argument("--no-spec", action="store_true", help="ultraspeed tier without a drafter (plain decoding)")
    s.add_argument("--min-accepted", type=min_accepted_arg, default="auto",
                   help="an ultraspeed request whose drafter commits fewer tokens per step than this after 4 "
                        "probe steps finishes with plain decoding (same output, cheaper steps). auto (default): "
                        "the break-even of the step costs timed at start-up (2 with --verify full); 0 = never")
    add_verify_flag(s)
    add_lookup_flag(s)
    add_block_size_flag(s)
    add_runtime_flag(s)
    s.add_argument("--ultraspeed-experts", choices=["mxfp4", "original"], default="mxfp4",
                   help="expert weights of the ultraspeed tier (mxfp4: its own engine and weights; for a dense "
                        "model the MLP is the expert)")
    s.add_argument("--ultraspeed-model", default=None, metavar="CHECKPOINT",
                   help="MXFP4 checkpoint of the same model for the ultraspeed tier (from `ultraspeed qat` or "
                        "`ultraspeed quantize`); default: quantize the served model's experts at startup")
    s.add_argument("--ultraspeed-rounding", choices=["gptq", "nearest"], default="gptq",
                   help="how the ultraspeed tier rounds its experts (a dense model: its MLP) to MXFP4 at startup "
                        "without --ultraspeed-model: gptq (default; error feedback over ~8k calibration tokens, "
                        "each expert from the tokens routed to it; a minute once for the default model, then "
                        "cached) or nearest (round-to-nearest)")
    s.add_argument("--weights", choices=["auto", "fp32", "int8", "q4"], default="auto",
                   help="dense weight format: auto (default) = int8 on a CPU with the compiled kernel; q4 = a "
                        "Q4_1 GGUF's 4-bit matrices kept 4-bit (lossless, less memory, slower here), the rest int8")
    s.add_argument("--served-model-name", default=None, help="model id of the standard tier (default: from the "
                   "model file); the ultraspeed tier is '<name>-ultraspeed'")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int_at_least(0, 65535), default=8000)
    s.add_argument("--api-keys-file", default=None, help="one API key per line; also read from ULTRASPEED_API_KEYS "
                   "(comma separated); with no keys the server is open")
    s.add_argument("--max-concurrent", type=SIZE, default=8, help="standard tier: requests decoding at once")
    s.add_argument("--ultraspeed-max-concurrent", type=SIZE, default=2, help="ultraspeed tier: requests at once")
    s.add_argument("--ultraspeed-price-multiplier", type=positive_float, default=3.0)
    s.add_argument("--price-input", type=NONNEGATIVE, default=0.5, help="USD per million prompt tokens (standard)")
    s.add_argument("--price-output", type=NONNEGATIVE, default=2.0, help="USD per million completion tokens (standard)")
    s.add_argument("--max-queue", type=SIZE, default=64, help="waiting requests per engine before 503 (with MXFP4 experts, the default, each tier has its own engine "
                        "and queue; also the most candidates one request may ask for)")
    s.add_argument("--max-context", type=int_at_least(2), default=2048, help="prompt + completion tokens per request")
    s.add_argument("--max-n", type=SIZE, default=16, help="largest n (candidates per prompt)")
    s.add_argument("--max-queued-per-key", type=SIZE, default=10, help="API calls in flight per key before 429")
    s.add_argument("--session-minutes", type=NONNEGATIVE, default=30.0,
                   help="trial session per API key, from its first accepted call; later calls get 429 (0 = no limit)")
    s.add_argument("--request-minutes", type=NONNEGATIVE, default=30.0, help="longest single call (0 = no limit)")
    s.add_argument("--idle-minutes", type=NONNEGATIVE, default=5.0, help="drop a stream with no tokens this long (0 = never)")
    s.add_argument("--enable-verifier", action="store_true", help="allow best-of-N `verifier` requests; they RUN "
                   "CLIENT-SUPPLIED PYTHON in a subprocess (time/memory limited, not sandboxed)")
    s.add_argument("--verifier-timeout", type=positive_float, default=5.0, help="seconds per candidate")
    s.add_argument("--drain-seconds", type=NONNEGATIVE, default=60.0, help="on SIGTERM/SIGINT: time in-flight requests "
                   "get to finish")
    s.add_argument("--threads", type=COUNT, default=0,
                   help="CPU threads, shared by the engines (default: every core available to the process)")
    add_device_flag(s)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_parallel_flags(s)
    s.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks (machine-readable with --json)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    bs = bench_sub.add_parser("speed", help="greedy decode tok/s: ours vs HF transformers vs llama.cpp")
    add_bench_flags(bs)
    bs.add_argument("--new-tokens", type=SIZE, default=128)
    bs.add_argument("--peers", nargs="*", default=["hf_transformers", "llama_cpp"],
                    choices=["hf_transformers", "llama_cpp"])
    bs.add_argument("--no-peers", action="store_true", help="measure our engine only")
    bs.add_argument("--drafter", default=None, help="also measure DFlash with this drafter")
    bs.set_defaults(func=cmd_bench_speed)
    ba = bench_sub.add_parser("acceptance", help="DFlash accepted length and speed-up per domain and block size")
    add_bench_flags(ba)
    ba.add_argument("--drafter", default=None)
    ba.add_argument("--domains", nargs="+", default=["code", "math", "chat", "agent"],
                    choices=["code", "math", "chat", "agent"])
    ba.add_argument("--block-sizes", type=int_at_least(2), nargs="+", default=[8, 16])
    ba.add_argument("--prompts", type=SIZE, default=4, help="prompts per domain")
    ba.add_argument("--max-tokens", type=SIZE, default=128)
    ba.add_argument("--split", choices=["eval", "train"], default="eval",
                    help="eval: held-out prompts (default); train: the drafter's training prompts (to see how much "
                    "of its acceptance is memorised)")
    ba.add_argument("--weights", choices=["auto", "fp32", "int8", "q4"], default="auto",
                    help="dense weight format of the target (auto: int8 on a CPU, as generate serves)")
    ba.add_argument("--verify", choices=["adaptive", "full"], default="adaptive",
                    help="whole blocks are always measured (the drafter's acceptance); adaptive (default) also "
                    "times adaptive verification, as generate and serve run it")
    ba.add_argument("--no-lookup", action="store_true",
                    help="skip the runs with lookup drafts (by default each block size also runs as generate "
                    "serves it: lookup drafts where the context repeats, verified as --verify says)")
    ba.add_argument("--lookup-corpus", default="auto", metavar="auto|none|FILE",
                    help="the served runs also draft from this corpus of the target's answers (auto: the shipped "
                    "one for the default model); with one, the same runs without it are timed too")
    ba.set_defaults(func=cmd_bench_acceptance)
    from ultraspeed.bench.report import DOMAINS as REPORT_DOMAINS, SYSTEMS as REPORT_SYSTEMS
    br = bench_sub.add_parser("report", help="proof of speed: ours (plain, MXFP4, DFlash, both) vs HF transformers "
                              "and llama.cpp (plain and prompt lookup) per domain; writes JSON, Markdown, charts")
    br.add_argument("--model", default="default")
    br.add_argument("--drafter", default=None, help="DFlash drafter (default model: the shipped one, if any)")
    br.add_argument("--out-dir", default="docs/bench", help="where report.json, report.md and the PNGs go")
    br.add_argument("--systems", nargs="+", default=list(REPORT_SYSTEMS), choices=REPORT_SYSTEMS)
    br.add_argument("--domains", nargs="+", default=list(REPORT_DOMAINS), choices=REPORT_DOMAINS)
    br.add_argument("--prompts", type=SIZE, default=3, help="held-out prompts per domain")
    br.add_argument("--repeats", type=SIZE, default=3, help="rounds over the prompts; medians are reported")
    br.add_argument("--new-tokens", type=SIZE, default=128)
    br.add_argument("--block-sizes", type=int_at_least(2), nargs="+", default=[4, 8, 16], help="DFlash block sizes swept")
    br.add_argument("--threads", type=SIZE, default=2, help="CPU threads for every system (default 2)")
    br.add_argument("--verify", choices=["adaptive", "full"], default="adaptive",
                    help="DFlash systems verify adaptively (default, as generate and serve do) or whole blocks")
    br.add_argument("--lookup-corpus", default="auto", metavar="auto|none|FILE",
                    help="DFlash systems also draft from this corpus of the target's answers, as served (auto: the "
                    "shipped one for the default model)")
    br.add_argument("--no-lookup", action="store_true",
                    help="DFlash systems draft with the drafter only (default: lookup drafts where the context "
                         "repeats, as generate and serve do)")
    br.add_argument("--quick", action="store_true", help="1 repeat, 1 prompt per domain, 16 new tokens")
    br.add_argument("--rounding", choices=["gptq", "nearest"], default="gptq",
                    help="MXFP4 systems: gptq (default; as the ultraspeed tier serves them, `mse` scales) or nearest")
    br.add_argument("--json", action="store_true", help="print the JSON report instead of the Markdown")
    br.set_defaults(func=cmd_bench_report)

    bq = bench_sub.add_parser("quant", help="MXFP4 experts: perplexity, expert bytes and decode tok/s of the "
                              "original vs round-to-nearest vs GPTQ vs QAT")
    add_bench_flags(bq)
    bq.add_argument("--qat", default=None, help="also measure this QAT checkpoint (from `ultraspeed qat`)")
    bq.add_argument("--scale-rule", default="mse", choices=["floor", "ceil", "even", "mse"])
    bq.add_argument("--chat-texts", type=SIZE, default=200, help="held-out ShareGPT turns (all 44 held-out "
                    "HumanEval tasks are always used)")
    bq.add_argument("--window", type=int_at_least(2), default=512, help="tokens per perplexity window")
    bq.add_argument("--new-tokens", type=SIZE, default=32, help="tokens generated per decode-speed sample")
    bq.set_defaults(func=cmd_bench_quant)

    q = sub.add_parser("quantize", help="write an MXFP4-expert checkpoint (gpt-oss blocks/scales layout)")
    q.add_argument("input", help="a Hugging Face model directory, a .gguf file, or 'default'")
    q.add_argument("output", help="output directory (config.json, model.safetensors, tokenizer files)")
    q.add_argument("--format", default="mxfp4", choices=["mxfp4"])
    q.add_argument("--scale-rule", default="mse", choices=["floor", "ceil", "even", "mse"],
                   help="block exponent rule (default mse: floor or one binade up, whichever reconstructs the block "
                        "better; ceil never clips, as gpt-oss's triton path)")
    q.add_argument("--rounding", default="nearest", choices=["nearest", "gptq"],
                   help="nearest (default): each weight to its nearest MXFP4 value; gptq: error feedback from the "
                        "second moments of each matrix's inputs over ~8k tokens of ShareGPT and HumanEval "
                        "training text (each routed expert from the tokens routed to it); slower, closer to the "
                        "original (default model: perplexity +7.6%% instead of +15.4%%)")
    q.set_defaults(func=cmd_quantize)

    qa = sub.add_parser("qat", help="MXFP4 quantization-aware training of the expert weights (distillation "
                        "from the original), then export an MXFP4 checkpoint")
    qa.add_argument("--model", default="default", help="model to train (directory, .gguf or 'default')")
    qa.add_argument("--out", default="runs/qat", help="training state (resumable) and the exported checkpoint")
    qa.add_argument("--steps", type=SIZE, default=100)
    qa.add_argument("--lr", type=positive_float, default=1e-4, help="AdamW learning rate of the expert weights")
    qa.add_argument("--seq-len", type=int_at_least(2), default=256)
    qa.add_argument("--seqs-per-step", type=SIZE, default=2)
    qa.add_argument("--chat-texts", type=COUNT, default=1000, help="ShareGPT train turns (plus all 120 HumanEval "
                    "train solutions)")
    qa.add_argument("--scale-rule", default="mse", choices=["floor", "ceil", "even", "mse"])
    qa.add_argument("--checkpoint-every", type=SIZE, default=25)
    qa.add_argument("--threads", type=COUNT, default=0, help="CPU threads (default: torch's choice)")
    qa.add_argument("--seed", type=int, default=0)
    qa.set_defaults(func=cmd_qat)

    lc = sub.add_parser("build-lookup-corpus", help="the target's greedy answers to training prompts, as a corpus "
                        "to draft from where a request's own context has no match (--lookup-corpus)")
    lc.add_argument("--model", default="default", help="target model (directory, .gguf or 'default')")
    lc.add_argument("--prompts", type=COUNT, nargs=4, default=[240, 400, 400, 240], metavar=("CODE", "MATH", "CHAT",
                    "AGENT"), help="training prompts per domain (default 240 400 400 240: the shipped corpus)")
    lc.add_argument("--max-new-tokens", type=SIZE, default=128)
    lc.add_argument("--batch", type=SIZE, default=16, help="sequences decoded at once")
    lc.add_argument("--weights", choices=["auto", "fp32", "int8", "q4"], default="auto",
                    help="the target's weight format while answering: the one it is served in (auto)")
    lc.add_argument("--threads", type=COUNT, default=0, help="CPU threads (default: torch's choice)")
    lc.add_argument("--out", required=True, help=".npz file to write")
    lc.set_defaults(func=cmd_build_lookup_corpus)

    c = sub.add_parser("cost", help="effective cost and time per completed task, standard vs ultraspeed tier")
    c.add_argument("--output-tokens", type=SIZE, default=2000, help="output tokens per task (default 2000)")
    c.add_argument("--prompt-tokens", type=COUNT, default=1000)
    c.add_argument("--standard-speed", type=positive_float, default=None, help="tok/s of the standard tier")
    c.add_argument("--ultraspeed-speed", type=positive_float, default=None, help="tok/s of the ultraspeed tier")
    c.add_argument("--from-bench", default=None, help="read both speeds from a bench speed/acceptance JSON")
    c.add_argument("--multiplier", type=positive_float, default=3.0, help="ultraspeed price multiplier (default 3)")
    c.add_argument("--price-in", type=NONNEGATIVE, default=0.5, help="USD per million input tokens at 1x")
    c.add_argument("--price-out", type=NONNEGATIVE, default=2.0, help="USD per million output tokens at 1x")
    c.add_argument("--ttft", type=NONNEGATIVE, default=0.5, help="seconds to first token (both tiers)")
    c.add_argument("--standard-retry-rate", type=float_in(0.0, 1.0), default=0.0, help="probability an attempt times out")
    c.add_argument("--ultraspeed-retry-rate", type=float_in(0.0, 1.0), default=0.0)
    c.add_argument("--value-of-time", type=NONNEGATIVE, default=0.0, help="USD per hour of waiting")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_cost)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:     # argparse has printed the usage error (or the help): its status is ours
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except BrokenPipeError:     # `ultraspeed generate ... | head`: the reader left; end quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (UltraSpeedError, ValueError, OSError) as e:   # bad input, parameter values, paths
        print(f"ultraspeed: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
