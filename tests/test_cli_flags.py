"""Command-line flags whose parsing carries a rule: --min-accepted auto and its fallback without step costs,
--corpus-share and the text it needs, --block-size auto, --lr-scale, --device."""

import argparse

import pytest

from ultraspeed.cli import build_parser, main, min_accepted_for, pick_runtime, train_config
from ultraspeed.train.drafter import TrainConfig


def parse(*flags):
    return build_parser().parse_args(["generate", "hi", *flags])


def test_min_accepted_defaults_to_the_measured_break_even():
    args = parse()
    assert args.verify == "adaptive" and args.min_accepted is None
    assert min_accepted_for(args, adaptive=True) is None
    assert min_accepted_for(args, adaptive=False) == 2.0        # no step costs: the fixed rule


def test_min_accepted_takes_a_number_and_refuses_words(capsys):
    assert min_accepted_for(parse("--min-accepted", "1.5", "--verify", "full"), adaptive=False) == 1.5
    assert min_accepted_for(parse("--min-accepted", "0"), adaptive=True) == 0.0
    with pytest.raises(SystemExit):
        parse("--min-accepted", "lots")
    assert "expected a number or 'auto'" in capsys.readouterr().err


def test_serve_has_the_same_flags():
    args = build_parser().parse_args(["serve", "--verify", "full", "--min-accepted", "auto", "--runtime", "static"])
    assert isinstance(args, argparse.Namespace) and args.verify == "full" and args.min_accepted is None
    assert args.runtime == "static" and build_parser().parse_args(["serve"]).runtime == "auto"


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_static_runtime_refuses_sharding_before_loading_anything(command, capsys):
    argv = [command, *(["hi"] if command == "generate" else []), "--model", "/no/such/model", "--runtime", "static",
            "--ep", "2"]
    assert main(argv) == 2
    assert "--runtime static runs on one device" in capsys.readouterr().err


def test_auto_runtime_is_static_on_one_gpu_only():
    import torch
    assert pick_runtime("auto", torch.device("cuda"), sharded=False) == "static"
    assert pick_runtime("auto", torch.device("cuda"), sharded=True) == "dynamic"
    assert pick_runtime("auto", torch.device("cpu"), sharded=False) == "dynamic"
    assert pick_runtime("static", torch.device("cpu"), sharded=False) == "static"


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "half"])
def test_corpus_share_is_a_fraction(bad, capsys):
    assert build_parser().parse_args(["train-drafter", "--corpus-share", "0.3"]).corpus_share == 0.3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-drafter", "--corpus-share", bad])
    assert "expected a fraction between 0 and 1" in capsys.readouterr().err


def test_corpus_share_without_text_fails_before_loading_anything(tmp_path, capsys):
    # The model path does not exist: reaching the loader would fail with another message.
    assert main(["train-drafter", "--corpus-share", "0.5", "--model", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "out")]) != 0
    assert "--corpus-share needs teacher-forced text" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_block_size_is_auto_or_a_real_block(capsys):
    assert parse().block_size == 0 and parse("--block-size", "12").block_size == 12
    assert build_parser().parse_args(["serve", "--block-size", "4"]).block_size == 4
    for bad in ("1", "-3", "eight"):
        with pytest.raises(SystemExit):
            parse("--block-size", bad)
        assert "expected 0 (auto) or a block length of at least 2" in capsys.readouterr().err


def test_lr_scale_multiplies_both_learning_rates(capsys):
    base = TrainConfig()
    default = train_config(build_parser().parse_args(["train-drafter"]))
    assert (default.lr_muon, default.lr_adam) == (base.lr_muon, base.lr_adam)
    scaled = train_config(build_parser().parse_args(["train-drafter", "--lr-scale", "0.25", "--steps", "9"]))
    assert (scaled.lr_muon, scaled.lr_adam, scaled.steps) == (base.lr_muon / 4, base.lr_adam / 4, 9)
    for bad in ("0", "-1", "nan", "fast"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train-drafter", "--lr-scale", bad])
        assert "number > 0, not" in capsys.readouterr().err


def test_device_flag_on_both_commands_and_a_clear_error_without_a_gpu(capsys):
    import torch
    for command in ("generate", "serve"):
        args = build_parser().parse_args([command, *(["hi"] if command == "generate" else []), "--device", "cpu"])
        assert args.device == "cpu"
        if torch.cuda.is_available():
            continue
        argv = [command, *(["hi"] if command == "generate" else []), "--model", "/no/such/model", "--device", "cuda"]
        assert main(argv) == 2
        assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err   # before loading anything
