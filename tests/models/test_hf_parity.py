"""Our decoder's logits match transformers' implementation of the same architecture on tiny random configs:
prefill, step-by-step decode through the KV cache, blocks (as speculative verification feeds them), rollback,
and batched decode of sequences with different lengths."""

import pytest
import torch

from tests.helpers import TINY_CONFIGS, hf_logits, hf_model, ours_from_hf

pytest.importorskip("transformers")

ATOL = 2e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine spinning OpenMP threads made
    this module about 8x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request, tmp_path_factory):
    """Built once per config: the tests only read the models (each makes its own cache)."""
    hf = hf_model(request.param)
    return hf, ours_from_hf(hf, tmp_path_factory.mktemp(request.param))


def run_ours(model, ids: torch.Tensor, cache, chunks: list[int]) -> torch.Tensor:
    """Feed ids [1, T] in chunks of the given sizes; return logits for every position."""
    out, start = [], 0
    for n in chunks:
        hidden, _ = model(ids[:, start:start + n], cache)
        out.append(model.logits(hidden))
        start += n
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_prefill_matches(pair):
    hf, ours = pair
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf, ids)
    got = run_ours(ours, ids, ours.new_cache(1, 64), [24])
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_decode_with_cache_matches(pair):
    hf, ours = pair
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    ref = hf_logits(hf, ids)
    # prefill 9, then single tokens, then a block of 5 (verification-shaped), then singles again
    got = run_ours(ours, ids, ours.new_cache(1, 64), [9, 1, 1, 1, 5, 1, 1, 1])
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_rollback_then_continue_matches(pair):
    hf, ours = pair
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    cache = ours.new_cache(1, 64)
    run_ours(ours, ids, cache, [10])
    junk = torch.randint(0, 128, (1, 6))
    ours(junk, cache)                  # a rejected draft block ...
    cache.crop(0, 10)                  # ... rolled back
    got = run_ours(ours, ids[:, 10:], cache, [3, 3])
    torch.testing.assert_close(got, hf_logits(hf, ids)[:, 10:], atol=ATOL, rtol=1e-4)


@torch.no_grad()
def test_batched_decode_of_different_lengths_matches(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(4)
    lengths = [5, 11, 8]
    seqs = [torch.randint(0, 128, (1, n + 4), generator=g) for n in lengths]
    cache = ours.new_cache(3, 64)
    for row, (seq, n) in enumerate(zip(seqs, lengths)):   # prefill each row on its own
        ours(seq[:, :n], cache, first_row=row)
    for step in range(4):
        batch_ids = torch.cat([s[:, n + step:n + step + 1] for s, n in zip(seqs, lengths)], dim=0)
        logits = ours.logits(ours(batch_ids, cache)[0])
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            ref = hf_logits(hf, seq[:, :n + step + 1])[:, -1]
            torch.testing.assert_close(logits[row:row + 1, -1], ref, atol=ATOL, rtol=1e-4)
