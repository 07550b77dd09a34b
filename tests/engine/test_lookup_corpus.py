"""The lookup corpus (engine/lookup_corpus.py): its hashed index proposes exactly what a brute-force scan of the
sequences finds, never runs past the end of a sequence, survives a save / load round trip and refuses a corrupt
file; drafting from it stays lossless (greedy output equals plain decoding, alone, in the serving engine and in
the static runtime) and pays off when the corpus knows the answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.engine.test_speculative import make_drafter, plain_tokens
from tests.helpers import hf_model, ours_from_hf, run_requests
from ultraspeed.engine import speculative
from ultraspeed.engine.generate import GenerationStats
from ultraspeed.engine.lookup_corpus import LookupCorpus
from ultraspeed.engine.lookup_draft import CORPUS_SLOT_ACCEPTANCE, NgramIndex, lookup_confidence
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.errors import UltraSpeedError

pytest.importorskip("transformers")


def brute_force(sequences, context, length, min_n=2, max_n=4):
    """The latest occurrence (in corpus order) of the longest n-gram ending `context` that has a successor in
    its own sequence, and what followed it there."""
    for n in range(min(max_n, len(context)), min_n - 1, -1):
        found = None
        for seq in sequences:
            for end in range(n, len(seq)):
                if seq[end - n:end] == context[-n:]:
                    found = seq[end:end + length]
        if found is not None:
            return found, n
    return [], 0


def random_sequences(seed, count=30, vocab=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 25, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


@pytest.mark.parametrize("seed", range(3))
def test_proposals_equal_a_brute_force_scan(seed):
    sequences = random_sequences(seed, vocab=3 + seed)
    g = torch.Generator().manual_seed(100 + seed)
    for min_n, max_n in ((2, 4), (4, 6)):         # the defaults are 4..6; 2..4 finds many more matches
        corpus = LookupCorpus.build(sequences, min_n, max_n)
        for _ in range(200):
            context = torch.randint(0, 4 + seed, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
            assert corpus.propose(context, 5) == brute_force(sequences, context, 5, min_n, max_n), context
    assert (LookupCorpus.build(sequences).min_n, LookupCorpus.build(sequences).max_n) == (4, 6)


def test_a_continuation_stops_at_the_end_of_its_sequence():
    corpus = LookupCorpus.build([[1, 2, 3, 4], [9, 9, 1, 2]], min_n=2)
    assert corpus.propose([7, 1, 2], 6) == ([3, 4], 2)        # not [3, 4, 9, 9, ...] across the boundary
    assert corpus.propose([9, 1, 2], 6) == ([3, 4], 2)        # (9, 1, 2) ends the second sequence: no successor
    assert corpus.propose([5, 6], 3) == ([], 0)


def test_save_load_round_trip_and_corrupt_files(tmp_path):
    sequences = random_sequences(7)
    corpus = LookupCorpus.build(sequences)
    corpus.save(tmp_path / "c.npz")
    loaded = LookupCorpus.load(tmp_path / "c.npz")
    assert np.array_equal(loaded.keys, corpus.keys) and np.array_equal(loaded.after, corpus.after)
    assert loaded.num_sequences == len(sequences)
    np.savez(tmp_path / "bad.npz", tokens=np.arange(5, dtype=np.uint32), starts=np.array([0, 9]),
             ngrams=np.array([2, 4]))
    with pytest.raises(UltraSpeedError, match="corrupt lookup corpus"):
        LookupCorpus.load(tmp_path / "bad.npz")
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(UltraSpeedError, match="not a lookup corpus"):
        LookupCorpus.load(tmp_path / "text.npz")
    whole = (tmp_path / "c.npz").read_bytes()
    for name, data in (("truncated.npz", whole[:len(whole) // 2]), ("empty.npz", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UltraSpeedError, match="not a lookup corpus"):
            LookupCorpus.load(tmp_path / name)
    for name, arrays in (("ngrams.npz", dict(ngrams=np.array([0, 0]))), ("2d.npz", dict(starts=np.zeros((2, 2))))):
        np.savez(tmp_path / name, **{"tokens": np.arange(5), "starts": np.array([0, 5]), "ngrams": np.array([2, 4]),
                                     **arrays})
        with pytest.raises(UltraSpeedError, match="corrupt lookup corpus"):
            LookupCorpus.load(tmp_path / name)
    np.savez(tmp_path / "negative.npz", tokens=np.array([3, -1, 4, 5, 6]), starts=np.array([0, 5]),
             ngrams=np.array([2, 4]))
    with pytest.raises(UltraSpeedError, match="negative token ids"):
        LookupCorpus.load(tmp_path / "negative.npz", vocab_size=10)


def test_the_own_context_comes_first_then_the_corpus():
    corpus = LookupCorpus.build([[1, 5, 6, 7, 8, 9, 10]])
    own = NgramIndex.of([1, 2, 3, 1, 2], corpus)
    assert own.draft(3) == ([3, 1, 2], lookup_confidence(2, 3))
    other = NgramIndex.of([4, 5, 6, 7, 8], corpus)
    assert other.draft(3) == ([9, 10], lookup_confidence(4, 2, CORPUS_SLOT_ACCEPTANCE))
    assert NgramIndex.of([4, 5, 6, 7, 8]).draft(3) == ([], [])          # no corpus
    assert NgramIndex.of([9, 6, 7, 8], corpus).draft(3) == ([], [])      # 3 tokens match: too short
    # Its own short continuation (one token left to copy) loses to the corpus's longer promise.
    both = NgramIndex.of([1, 2, 3, 8, 9, 8, 9], LookupCorpus.build([[2, 3, 8, 9, 8, 9, 10, 11, 12, 13]]))
    assert both.propose(4) == ([8, 9], 2)
    assert both.draft(4) == ([10, 11, 12, 13], lookup_confidence(6, 4, CORPUS_SLOT_ACCEPTANCE))
    assert lookup_confidence(4, 1, CORPUS_SLOT_ACCEPTANCE)[0] < lookup_confidence(4, 1)[0]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    # A tiny random model whose greedy answer to PROMPT varies (others repeat one token, which any lookup copies)
    return ours_from_hf(hf_model("mistral", seed=5), tmp_path_factory.mktemp("mistral"))


PROMPT = [10, 20, 30, 40, 50]


@pytest.mark.parametrize("knows_the_answer", [True, False])
def test_drafting_from_the_corpus_is_lossless_and_pays_when_it_knows_the_answer(target, knows_the_answer):
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    truth = plain_tokens(target, PROMPT, params)
    # A corpus holding the same answer to another prompt that ends alike, or unrelated text.
    text = [[1, 2] + PROMPT[-3:] + truth] if knows_the_answer else random_sequences(3, vocab=120)
    stats = GenerationStats()
    got = sum(speculative.generate_speculative(target, make_drafter(target, 6), PROMPT, params, stats=stats,
                                               lookup=True, corpus=LookupCorpus.build(text)), [])
    assert got == truth
    if knows_the_answer:
        assert stats.mean_accepted > 4 and stats.lookup_steps == stats.target_forwards


def test_the_serving_engine_and_the_static_runtime_draft_from_the_corpus(target):
    from ultraspeed.engine.scheduler import Engine, EngineConfig, EngineRequest, GroupConfig
    from ultraspeed.runtime.loop import generate_static
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    truth = plain_tokens(target, PROMPT, params)
    corpus = LookupCorpus.build([PROMPT[-3:] + truth])
    stats = GenerationStats()
    assert sum(generate_static(target, PROMPT, params, drafter=make_drafter(target, 4), stats=stats, lookup=True,
                               corpus=corpus), []) == truth
    assert stats.mean_accepted > 3
    for runtime in ("dynamic", "static"):
        config = EngineConfig(groups=(GroupConfig("ultraspeed", 1, speculative=True),), max_len=64, lookup=True,
                              adaptive_verify=False, runtime=runtime)
        engine = Engine(target, config, make_drafter(target, 4), lookup_corpus=corpus).start()
        try:
            reply, = run_requests(engine, [EngineRequest(PROMPT, params, None, group="ultraspeed")])
        finally:
            engine.stop()
        assert reply.tokens == truth and reply.final.stats.mean_accepted > 3


# ---------------------------------------------------------------------------------------------------- CLI


def test_build_lookup_corpus_answers_training_prompts_greedily(target, monkeypatch):
    from ultraspeed.loader import LoadedModel
    from ultraspeed.train import lookup_corpus_data

    class Tok:
        stop_token_ids = ()

        def encode_chat(self, messages):
            return [len(m["content"]) % 100 + 1 for m in messages] + [7, 8]

    asked = []
    monkeypatch.setattr(lookup_corpus_data, "domain_prompts", lambda domain, split, count: asked.append(
        (domain, split, count)) or [[{"role": "user", "content": "x" * (i + len(domain))}] for i in range(count)])
    loaded = LoadedModel(target.config, target, Tok(), "tiny")
    corpus = lookup_corpus_data.build_lookup_corpus(loaded, {"code": 2, "math": 0, "agent": 1}, max_new_tokens=5)
    assert asked == [("code", "train", 2), ("agent", "train", 1)]       # held-out prompts are never used
    assert corpus.num_sequences == 3
    prompt = Tok().encode_chat([{"role": "user", "content": "xxxxx"}])
    answer = plain_tokens(target, prompt, SamplingParams(max_tokens=5))
    first = corpus.tokens[corpus.starts[1]:corpus.starts[2]].tolist()    # code prompt 1: "x" * 5
    assert first == prompt + answer


def test_cli_refuses_a_bad_corpus_before_loading_the_model(tmp_path, capsys):
    from ultraspeed.cli import main
    assert main(["generate", "hi", "--model", "/no/such/model", "--lookup-corpus", str(tmp_path / "none.npz")]) == 2
    assert "not a lookup corpus" in capsys.readouterr().err
    assert main(["build-lookup-corpus", "--out", str(tmp_path / "corpus.txt")]) == 2
    assert "--out must name a .npz file" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_corpus_for_another_vocabulary_is_refused(target):
    from ultraspeed.engine.scheduler import Engine, EngineConfig
    corpus = LookupCorpus.build([[1, 2, 3, 4, 5, target.config.vocab_size]])
    with pytest.raises(UltraSpeedError, match="beyond this model's vocabulary"):
        corpus.check_vocab(target.config.vocab_size)
    with pytest.raises(UltraSpeedError, match="built for another model"):
        Engine(target, EngineConfig(lookup=True), make_drafter(target, 4), lookup_corpus=corpus)
    LookupCorpus.build([[1, 2, 3, 4, 5]]).check_vocab(target.config.vocab_size)


def test_a_corpus_draft_must_promise_more_than_the_drafter_gets_accepted():
    corpus = LookupCorpus.build([[1, 5, 6, 7, 8, 9, 10, 11, 12]])
    index = NgramIndex.of([4, 5, 6, 7, 8], corpus)
    promise = lookup_confidence(4, 4, CORPUS_SLOT_ACCEPTANCE)
    assert index.draft(4) == ([9, 10, 11, 12], promise)          # the drafter has not run yet
    index.record_step(9, looked_up=True)                          # lookup steps leave the drafter's rate alone
    assert index.drafter_rate is None
    index.record_step(4, looked_up=False)                         # the drafter got 3 drafts accepted
    assert index.drafter_rate == 3.0 and index.draft(4) == ([], [])
    assert index.draft(4, drafter=False) == ([9, 10, 11, 12], promise)    # after giving up on the drafter
    for _ in range(10):
        index.record_step(1, looked_up=False)                     # ... or once the drafter stops paying
    assert index.drafter_rate < 0.2 and index.draft(4) == ([9, 10, 11, 12], promise)
