import pytest
import torch

from ultraspeed.engine.sampler import SamplingParams, make_generator, sample, token_distribution


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0]])
    assert sample(logits, SamplingParams(), None).tolist() == [1, 0]


def test_top_k_keeps_k_largest():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0])
    p = token_distribution(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p > 0).tolist() == [False, True, True, False]
    assert p.sum() == pytest.approx(1.0)


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p = token_distribution(probs.log(), SamplingParams(temperature=1.0, top_p=0.75))
    assert (p > 0).tolist() == [True, True, False, False]
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 2.0])
    cold = token_distribution(logits, SamplingParams(temperature=0.5))
    hot = token_distribution(logits, SamplingParams(temperature=2.0))
    assert cold[1] > hot[1] > 0.5


def test_seed_reproducible_and_frequencies_right():
    logits = torch.tensor([0.0, 1.0, 2.0]).expand(20000, 3)
    params = SamplingParams(temperature=1.0, seed=7)
    a = sample(logits, params, make_generator(7))
    b = sample(logits, params, make_generator(7))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / len(a)
    torch.testing.assert_close(freq, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), -1), atol=0.015, rtol=0)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0)])
def test_invalid_params_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
