"""What each rank of the distributed tests runs (its own module so that spawned processes import only this,
not pytest plugins or transformers). Also the single-process reference: the same function with no plan."""

from __future__ import annotations

import contextlib
import copy
import io
import os
from pathlib import Path
from unittest import mock

import torch

from ultraspeed.engine.generate import generate_plain
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.engine.speculative import generate_speculative
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random

PROMPT = [3, 17, 42, 9, 100, 5, 77, 31]
NEW_TOKENS = 24


def drafter_for(model) -> DFlashDrafter:
    drafter = DFlashDrafter(DFlashConfig.for_target(model.config, num_layers=1, num_features=2, block_size=4))
    init_random(drafter, seed=7)
    return drafter.requires_grad_(False)


@torch.inference_mode()
def run_case(model) -> dict:
    """Prompt logits at every position, then greedy plain, greedy speculative and sampled speculative tokens."""
    cache = model.new_cache(1, 64)
    hidden, _ = model(torch.tensor([PROMPT]), cache)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    sampled = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.8, seed=1)
    drafter = drafter_for(model)
    return {
        "logits": model.logits(hidden)[0],
        "kv_heads": [k.shape[1] for k in cache.keys],
        "plain": sum(generate_plain(model, PROMPT, greedy), []),
        "speculative": sum(generate_speculative(model, drafter, PROMPT, greedy), []),
        "speculative_sampled": sum(generate_speculative(model, drafter, PROMPT, sampled), []),
    }


def engine_outputs(model, drafter) -> list[list[int]]:
    """Requests of both tiers through the server's continuous-batching engine; they finish at different times,
    so rows are retired and moved while others still decode."""
    import threading
    from ultraspeed.engine.scheduler import Engine, EngineConfig, EngineRequest, GroupConfig
    groups = (GroupConfig("standard", 2), GroupConfig("ultraspeed", 2, speculative=True))
    engine = Engine(model, EngineConfig(groups=groups, max_len=64, max_queue=16), drafter).start()
    tokens: list[list[int]] = [[] for _ in range(6)]
    done = [threading.Event() for _ in range(6)]

    def collector(i):
        def on_update(update):
            tokens[i].extend(update.token_ids)
            if update.done:
                done[i].set()
        return on_update

    try:
        engine.submit([EngineRequest(PROMPT[:3 + i], SamplingParams(max_tokens=4 + 3 * i, ignore_eos=True),
                                     collector(i), group=("standard", "ultraspeed")[i % 2]) for i in range(6)])
        for event in done:
            assert event.wait(120), "engine request did not finish"
    finally:
        engine.stop()
    return tokens


def run_cli(args: list[str], model=None) -> tuple[int, str, str]:
    """`ultraspeed ARGS` in this process -> (exit code, stdout, stderr). With `model`, the command gets a copy of
    it instead of loading the checkpoint's weights (the first Decoder built in a fresh process pays seconds of
    torch imports, which two ranks on two shared cores pay twice over)."""
    from ultraspeed import cli, loader
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if model is not None:
            def load_model(path, dtype=None):
                tokenizer = loader.tokenizer_from_hf_dir(Path(path), model.config.eos_token_ids)
                return loader.LoadedModel(model.config, copy.deepcopy(model), tokenizer, str(path))
            stack.enter_context(mock.patch.object(loader, "load_model", load_model))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        code = cli.main(args)
    return code, out.getvalue(), err.getvalue()


def rank_main(rank: int, world_size: int, port: int, models: dict, cases: list[tuple[str, str, int, int]],
              cli_model: str, cli_args: list[str], out_dir: str) -> None:
    """torch.multiprocessing.spawn entry: set the environment torchrun would set, join the group, run every
    case, then the serving engine on rank 0 with rank 1 following, then `ultraspeed generate` itself (last: the
    command shuts the group down when it ends).

    The unsharded models come from the parent (their tensors in shared memory): building a Decoder costs a few
    seconds of first-time imports per process, more than all the cases together."""
    from ultraspeed.parallel import ParallelPlan, follow, init_from_env, lead, parallelize, shared_seed, shutdown
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    env = init_from_env("cpu")
    try:
        results = {}
        for key, name, tp, ep in cases:
            model = parallelize(copy.deepcopy(models[name]), ParallelPlan(tp, ep), env.rank, env.world_size,
                                env.group)
            results[key] = run_case(model)
        model = parallelize(copy.deepcopy(models[cli_model]), ParallelPlan(2, 2), env.rank, env.world_size)
        if env.is_main:
            stop_followers = lead(model, env)
            results["engine"] = engine_outputs(model, drafter_for(model))
            stop_followers()
        else:
            follow(model, env)
        results["seed"] = shared_seed(None, env)
        results["cli"] = run_cli(cli_args, models[cli_model])
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        shutdown(env)
