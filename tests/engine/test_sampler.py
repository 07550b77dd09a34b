import pytest
import torch

from ultraspeed.engine.sampler import SamplingParams, draw, make_generator, sample, token_distribution


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


def full_sort_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by sorting the whole vocabulary: the definition nucleus_candidates must reproduce."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(mass_before >= top_p, 0.0))
    return kept / kept.sum(-1, keepdim=True)


@pytest.mark.parametrize("spread", [8.0, 0.05], ids=["peaked", "nearly-flat"])   # flat: the candidates widen
def test_top_p_over_a_large_vocabulary_matches_sorting_all_of_it(spread):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 49152, generator=g) * spread
    for top_p in (0.5, 0.9, 0.999):
        got = token_distribution(logits, SamplingParams(temperature=1.0, top_p=top_p))
        torch.testing.assert_close(got, full_sort_top_p(torch.softmax(logits, -1), top_p))


def test_draw_follows_the_probabilities_and_never_draws_a_zero():
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0]).expand(30000, 6)
    tokens = draw(probs, make_generator(3))
    assert tokens.shape == (30000,)
    freq = torch.bincount(tokens, minlength=6).float() / len(tokens)
    assert freq[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq, probs[0], atol=0.012, rtol=0)
    unnormalized = torch.tensor([[0.0, 2.0, 6.0]]).expand(20000, 3)          # draw normalizes
    freq = torch.bincount(draw(unnormalized, make_generator(4)), minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.25, 0.75]), atol=0.012, rtol=0)


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


def test_tiny_temperatures_are_greedy_and_tiny_top_p_keeps_the_top_token():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 5
    greedy = logits.argmax(-1)
    assert SamplingParams(temperature=1e-40).greedy
    for params in (SamplingParams(temperature=1e-40), SamplingParams(temperature=1.0, top_p=1e-300),
                   SamplingParams(temperature=1.0, top_p=1e-45)):
        probs = token_distribution(logits, params)
        assert torch.isfinite(probs).all()
        assert torch.equal(probs.argmax(-1), greedy) and torch.equal(probs.max(-1).values, torch.ones(3))
        assert torch.equal(sample(logits, params, make_generator(1)), greedy)


def test_any_integer_seed_gives_a_reproducible_generator():
    for seed in (2 ** 64, 2 ** 70 + 3, -(2 ** 63) - 1, 2 ** 64 - 1, -5):
        a, b = make_generator(seed), make_generator(seed)
        assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_a_row_of_nans_never_draws_past_the_vocabulary():
    probs = torch.full((2, 10), float("nan"))
    assert draw(probs, make_generator(0)).max() <= 9
