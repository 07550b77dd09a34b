"""Command-line flags whose parsing carries a rule: --min-accepted auto and its fallback without step costs."""

import argparse

import pytest

from ultraspeed.cli import build_parser, min_accepted_for


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
    args = build_parser().parse_args(["serve", "--verify", "full", "--min-accepted", "auto"])
    assert isinstance(args, argparse.Namespace) and args.verify == "full" and args.min_accepted is None
