"""A running batch (rows admitted and retired as sequences finish) gives each prompt exactly its own
plain-decoding output."""

import pytest

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.engine.batch_generate import generate_batch
from ultraspeed.engine.generate import generate_plain
from ultraspeed.engine.sampler import SamplingParams

pytest.importorskip("transformers")


def test_running_batch_matches_single_sequences(tmp_path):
    model = ours_from_hf(hf_model("qwen2", seed=3), tmp_path)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4], [42], [5, 5, 5, 5], [100, 101]]
    params = SamplingParams(max_tokens=12)
    truth = [sum(generate_plain(model, p, SamplingParams(max_tokens=12, ignore_eos=True)), []) for p in prompts]
    # Stop tokens make sequences finish at different steps, exercising row retirement and compaction.
    stop = (truth[0][3], truth[3][6])
    expected = []
    for t in truth:
        cut = next((i for i, tok in enumerate(t) if tok in stop), len(t) - 1)
        expected.append(t[:cut + 1])
    got = generate_batch(model, prompts, params, stop_ids=stop, max_batch=3)
    assert got == expected
