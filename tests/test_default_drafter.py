"""The shipped DFlash drafter on the embedded default model, served as `generate` serves it (int8 dense weights
on a CPU): speculative output, whole blocks or the CPU's shorter blocks with adaptive verification and lookup
drafts, equals plain greedy decoding."""

import pytest
import torch

from ultraspeed.drafters import drafter_for
from ultraspeed.engine.generate import GenerationStats, generate_plain
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.engine.speculative import generate_speculative
from ultraspeed.engine.verify_length import measure_step_cost, serving_block_size
from ultraspeed.loader import load_model
from ultraspeed.models.dflash import load_drafter, with_block_size
from ultraspeed.quant.int8 import apply_weight_format, match_drafter_weights
from ultraspeed.train.prompts import domain_prompts


@pytest.fixture(scope="module")
def served():
    loaded = load_model("default")
    drafter = load_drafter(drafter_for("default", None))
    match_drafter_weights(drafter, apply_weight_format(loaded.model, "auto"), loaded.model)
    return loaded, drafter


@pytest.mark.parametrize("domain", ["code", "agent"])
def test_shipped_drafter_is_lossless_on_the_default_model(served, domain):
    loaded, drafter = served
    model, tok = loaded.model, loaded.tokenizer
    prompt = tok.encode_chat(domain_prompts(domain, "eval", 1)[0])
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = sum(generate_plain(model, prompt, params), [])
    # Whole blocks of the drafter's own length from the drafter alone, and what `generate` serves on a CPU:
    # shorter blocks, adaptive verification, lookup drafts where the context repeats.
    served = with_block_size(drafter, serving_block_size(drafter.config.block_size, 0, torch.device("cpu")))
    assert served.config.block_size < drafter.config.block_size
    for d, cost, lookup in ((drafter, None, False), (served, measure_step_cost(model, served, repeats=1), True)):
        stats = GenerationStats()
        assert sum(generate_speculative(model, d, prompt, params, stats=stats, step_cost=cost, lookup=lookup),
                   []) == plain
        assert stats.target_forwards < 40          # several tokens were committed in some steps
