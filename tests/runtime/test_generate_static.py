"""`generate_static` (runtime/loop.py), the single-sequence loop of `generate --runtime static`: the same greedy
tokens as the dynamic path, plain and speculative, with stop tokens and token limits. On the CPU it runs the
static step eagerly, which is what a GPU captures as a CUDA graph."""

from __future__ import annotations

import json

import pytest

from tests.helpers import char_tokenizer, hf_model, ours_from_hf, save_checkpoint
from ultraspeed.cli import main
from ultraspeed.engine.generate import GenerationStats, generate_plain
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random, save_drafter
from ultraspeed.runtime.loop import generate_static

pytest.importorskip("transformers")

PROMPT = [3, 17, 42, 9, 100, 5]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return ours_from_hf(hf_model("qwen3", seed=5), tmp_path_factory.mktemp("qwen3"))


def make_drafter(target, block_size=4):
    d = DFlashDrafter(DFlashConfig.for_target(target.config, num_layers=1, num_features=2, block_size=block_size))
    init_random(d, 0)
    return d.requires_grad_(False)


@pytest.mark.parametrize("block_size", [None, 4])
def test_static_generation_equals_the_dynamic_path(target, block_size):
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    stats = GenerationStats()
    drafter = make_drafter(target, block_size) if block_size else None
    got = sum(generate_static(target, PROMPT, params, drafter=drafter, stats=stats), [])
    assert got == sum(generate_plain(target, PROMPT, params), [])
    assert stats.new_tokens == 30 and stats.finish_reason == "length"
    assert len(stats.accepted_lengths) == stats.target_forwards and sum(stats.accepted_lengths) >= 29
    if drafter is None:
        assert stats.target_forwards == 29          # one token per step after the prefill's


def test_a_stop_token_ends_static_generation(target):
    truth = sum(generate_plain(target, PROMPT, SamplingParams(max_tokens=20, ignore_eos=True)), [])
    stop = truth[6]
    stats = GenerationStats()
    got = sum(generate_static(target, PROMPT, SamplingParams(max_tokens=20), (stop,), make_drafter(target),
                              stats), [])
    assert got == truth[:truth.index(stop) + 1] and stats.finish_reason == "stop"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, target):
    directory = save_checkpoint(hf_model("qwen3", seed=5), tmp_path_factory.mktemp("cli"))
    char_tokenizer(directory)
    save_drafter(make_drafter(target), directory / "drafter.safetensors")
    return directory


def test_generate_runtime_static_prints_what_the_dynamic_runtime_prints(checkpoint, capsys):
    common = ["generate", "The quick brown fox", "--model", str(checkpoint), "--raw", "--max-tokens", "12",
              "--drafter", str(checkpoint / "drafter.safetensors"), "--threads", "1", "--verify", "full"]
    outputs = {}
    for runtime in ("dynamic", "static"):
        assert main([*common, "--runtime", runtime]) == 0
        captured = capsys.readouterr()
        record = json.loads(captured.err.strip().splitlines()[-1])
        assert record["runtime"] == runtime and record["device"] == "cpu" and record["new_tokens"] == 12
        outputs[runtime] = captured.out
    assert outputs["static"] == outputs["dynamic"] and outputs["static"].strip()


def test_runtime_static_refuses_sharding_before_loading_anything(capsys):
    assert main(["generate", "hi", "--model", "/no/such/model", "--runtime", "static", "--tp", "2"]) == 2
    assert "--runtime static" in capsys.readouterr().err


def test_near_the_context_end_static_generation_decodes_plainly(target):
    """Two positions left: no room for a verify block of 4, so the static loop takes plain steps, as the dynamic
    path does, and stops where the context ends."""
    prompt = [(7 * i) % 100 + 1 for i in range(target.config.max_position - 2)]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    got = sum(generate_static(target, prompt, params, drafter=make_drafter(target)), [])
    assert got == sum(generate_plain(target, prompt, params), []) and len(got) == 2


def test_generate_runtime_static_samples_reproducibly(checkpoint, capsys):
    """`--runtime static --temperature` samples in the static step: the same seed prints the same text, another
    seed another text."""
    common = ["generate", "The quick brown fox", "--model", str(checkpoint), "--raw", "--max-tokens", "16",
              "--drafter", str(checkpoint / "drafter.safetensors"), "--threads", "1", "--runtime", "static",
              "--temperature", "1.0"]
    outputs = []
    for seed in ("1", "1", "2"):
        assert main([*common, "--seed", seed]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.err.strip().splitlines()[-1])["runtime"] == "static"
        outputs.append(captured.out)
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
