"""Two gloo processes on 127.0.0.1 give what one process gives: logits within float tolerance, and the same
tokens for plain, speculative (random DFlash drafter) and sampled speculative decoding, for dense models under
TP and MoE models under EP, TP+EP and TP alone. Both ranks must also agree with each other token for token.
The serving engine on rank 0, with rank 1 replaying its model calls, gives the single-process engine's tokens.
Then `ultraspeed generate --tp 2 --ep 2` on both ranks prints, on rank 0 only, what one process prints.

All cases run in one spawn of two processes (process start-up dominates the cost); each case is its own test.
The spawned ranks get exactly the environment torchrun sets; the launcher itself, as in
`torchrun --nproc-per-node 2 --master-addr 127.0.0.1 -m ultraspeed generate ... --tp 2`, is not started here
(a third Python start-up and model load on two shared cores; docs/parallelism.md shows that command)."""

import copy
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import char_tokenizer, hf_model, ours_from_hf, save_checkpoint
from tests.parallel import worker
from ultraspeed.models.dflash import save_drafter

pytest.importorskip("transformers")

WORLD = 2
# key -> (tiny model, tp, ep)
CASES = {
    "llama-tp2": ("llama", 2, 1),
    "qwen3_moe-ep2": ("qwen3_moe", 1, 2),
    "qwen3_moe-tp2-ep2": ("qwen3_moe", 2, 2),
    "qwen3_moe-tp2": ("qwen3_moe", 2, 1),
    "mixtral-tp2-ep2": ("mixtral", 2, 2),
    "qwen3_moe-mxfp4-tp2-ep2": ("qwen3_moe-mxfp4", 2, 2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mxfp4_experts(model):
    """A copy with packed MXFP4 experts, on the plain-torch matmul (the compiled CPU kernel has its own tests;
    here the subject is splitting packed experts over ranks)."""
    from ultraspeed.quant.apply import quantize_experts, set_kernel
    model = quantize_experts(copy.deepcopy(model))
    set_kernel(model, False)
    assert type(model.layers[1].mlp.experts).__name__ == "MXFP4Experts"
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per case (single-process reference, rank 0, rank 1); under "cli" the three generate commands' output."""
    hf = {name: hf_model(name, seed=11) for name in ("llama", "mixtral", "qwen3_moe")}
    models = {name: ours_from_hf(model, tmp_path_factory.mktemp(name)) for name, model in hf.items()}
    models["qwen3_moe-mxfp4"] = mxfp4_experts(models["qwen3_moe"])
    cli_dir = save_checkpoint(hf["qwen3_moe"], tmp_path_factory.mktemp("cli"))
    char_tokenizer(cli_dir)
    save_drafter(worker.drafter_for(models["qwen3_moe"]), cli_dir / "drafter.safetensors")
    cli_args = ["generate", "The quick brown fox", "--model", str(cli_dir), "--raw", "--max-tokens", "12",
                "--drafter", str(cli_dir / "drafter.safetensors"), "--threads", "1"]

    out = tmp_path_factory.mktemp("ranks")
    cases = [(key, name, tp, ep) for key, (name, tp, ep) in CASES.items()]
    mp.spawn(worker.rank_main, args=(WORLD, free_port(), models, cases, "qwen3_moe",
                                     cli_args + ["--tp", "2", "--ep", "2"], str(out)), nprocs=WORLD, join=True)
    reference = {name: worker.run_case(model) for name, model in models.items()}
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    results = {key: (reference[name], ranks[0][key], ranks[1][key]) for key, (name, _, _) in CASES.items()}
    results["cli"] = (worker.run_cli(cli_args), ranks[0]["cli"], ranks[1]["cli"])    # this one loads from disk
    results["seed"] = (ranks[0]["seed"], ranks[1]["seed"])
    results["engine"] = (worker.engine_outputs(models["qwen3_moe"], worker.drafter_for(models["qwen3_moe"])),
                         ranks[0]["engine"])
    return results


@pytest.mark.parametrize("key", list(CASES))
def test_same_as_one_process(runs, key):
    reference, rank0, rank1 = runs[key]
    torch.testing.assert_close(rank0["logits"], reference["logits"], atol=1e-4, rtol=1e-4)
    for kind in ("plain", "speculative", "speculative_sampled"):
        assert rank0[kind] == reference[kind], kind
        assert rank1[kind] == rank0[kind], kind          # lockstep: both ranks decided the same
    assert len(reference["plain"]) == worker.NEW_TOKENS


@pytest.mark.parametrize("key", [k for k, (_, tp, _) in CASES.items() if tp > 1])
def test_kv_cache_holds_only_local_heads(runs, key):
    reference, rank0, _ = runs[key]
    assert rank0["kv_heads"] == [h // WORLD for h in reference["kv_heads"]]


def test_generate_command_prints_once_on_rank_0(runs):
    single, rank0, rank1 = runs["cli"]
    assert single[0] == rank0[0] == rank1[0] == 0
    assert rank0[1] == single[1] and single[1].strip()          # the same completion text
    assert rank1[1] == "" and rank1[2] == ""                    # other ranks stay silent
    stats = json.loads(rank0[2].strip().splitlines()[-1])
    assert (stats["tp"], stats["ep"], stats["world_size"], stats["speculative"]) == (2, 2, 2, True)
    assert stats["new_tokens"] == json.loads(single[2].strip().splitlines()[-1])["new_tokens"]


def test_ranks_share_an_unseeded_sampling_seed(runs):
    assert runs["seed"][0] == runs["seed"][1]


def test_serving_engine_with_a_follower(runs):
    single, leader = runs["engine"]
    assert leader == single
    assert [len(t) for t in single] == [4 + 3 * i for i in range(6)]
