"""Teacher-forced drafter data from existing text: every label is the target's own greedy prediction at that
position, the features are the target's, the cache is reused, and it trains beside self-distilled data."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random
from ultraspeed.train import corpus_data
from ultraspeed.train.corpus_data import CorpusSpec, build_or_load_corpus
from ultraspeed.train.distill_data import DataMix, DistillData
from ultraspeed.train.drafter import block_loss, on_target_path, pick_sequences

pytest.importorskip("transformers")
VOCAB, EOS = 96, 95
LAYERS = (0, 1)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return ours_from_hf(hf_model("qwen2", seed=7, vocab_size=VOCAB, eos_token_id=EOS, bos_token_id=EOS),
                        tmp_path_factory.mktemp("target")).requires_grad_(False)


class Tok:
    """A character tokenizer with a two-role template; the generation prompt is a prefix of the full chat."""

    def encode_chat(self, messages, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return [ord(c) % 90 + 1 for c in text]


def conversations(shard):
    return [[{"role": "user", "content": f"question {i}"},
             {"role": "assistant", "content": f"an answer of some length, number {i} " * 3}]
            for i in range(shard.start, shard.stop)]


def test_labels_are_the_targets_greedy_predictions(target, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_data, "shard_conversations", conversations)
    loaded = SimpleNamespace(model=target, tokenizer=Tok())
    spec = CorpusSpec(chat=3, code=0, max_tokens=60, target_layer_ids=LAYERS)
    data = build_or_load_corpus(loaded, spec, tmp_path)
    assert len(data) == 3 and all(len(t) == 60 for t in data.tokens)
    assert data.prompt_lens == [len(Tok().encode_chat(m[:1])) for m in conversations(corpus_data.corpus_shards(spec)[0])]
    for i, ids in enumerate(data.tokens):
        with torch.inference_mode():
            hidden, captured = target(torch.tensor([ids]), target.new_cache(1, 64), LAYERS)
            greedy = target.logits(hidden)[0].argmax(-1).tolist()
        assert data.sequence_labels(i) == ids[:1] + greedy[:-1]
        assert data.sequence_labels(i) != ids                   # the text is not the target's: labels differ
        torch.testing.assert_close(data.sequence_features(i), torch.cat(captured, -1)[0], atol=2e-3, rtol=1e-3)
    # Built once: a second call loads the cache instead of running the target again.
    monkeypatch.setattr(corpus_data, "write_features", lambda *a, **k: pytest.fail("rebuilt the corpus"))
    again = build_or_load_corpus(loaded, spec, tmp_path)
    assert again.tokens == data.tokens
    assert [again.sequence_labels(i) for i in range(3)] == [data.sequence_labels(i) for i in range(3)]


def test_a_larger_corpus_reuses_the_shards_of_a_smaller_one(target, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_data, "shard_conversations", conversations)
    built = []
    real_write = corpus_data.write_features
    monkeypatch.setattr(corpus_data, "write_features",
                        lambda loaded, tokens, *a, **k: built.append(len(tokens)) or real_write(loaded, tokens, *a, **k))
    loaded = SimpleNamespace(model=target, tokenizer=Tok())
    small = build_or_load_corpus(loaded, CorpusSpec(chat=3, code=0, max_tokens=70, target_layer_ids=LAYERS),
                                 tmp_path, shard_size=2)
    assert built == [2, 1] and len(small) == 3                 # shards [0, 2) and [2, 3)
    built.clear()
    large = build_or_load_corpus(loaded, CorpusSpec(chat=5, code=0, max_tokens=70, target_layer_ids=LAYERS),
                                 tmp_path, shard_size=2)
    assert built == [2, 1]                                      # [0, 2) reused; [2, 4) and [4, 5) are new
    assert len(large) == 5 and large.tokens[:2] == small.tokens[:2]
    assert large.tokens == [Tok().encode_chat(m, add_generation_prompt=False)[:70]
                            for m in conversations(SimpleNamespace(start=0, stop=5))]
    # Another target layer set is another corpus: nothing is reused.
    built.clear()
    build_or_load_corpus(loaded, CorpusSpec(chat=2, code=0, max_tokens=70, target_layer_ids=(1,)), tmp_path,
                         shard_size=2)
    assert built == [2]


def test_shards_cover_each_domain_once_with_fixed_boundaries():
    shards = corpus_data.corpus_shards(CorpusSpec(chat=450, code=120), shard_size=200)
    assert [(s.domain, s.start, s.stop) for s in shards] == [("chat", 0, 200), ("chat", 200, 400), ("chat", 400, 450),
                                                              ("code", 0, 120)]
    assert len({s.dirname for s in shards}) == 4


def drafter_and_sequence(target, block_size, seed):
    """A random one-layer drafter, a random 40-token sequence and the target's features of it."""
    drafter = DFlashDrafter(DFlashConfig.for_target(target.config, num_layers=1, num_features=2,
                                                    block_size=block_size))
    init_random(drafter, 0)
    tokens = torch.randint(1, 90, (40,), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        _, captured = target(tokens.view(1, -1), target.new_cache(1, 40), drafter.config.target_layer_ids)
    return drafter, tokens, torch.cat(captured, -1)[0]


def test_block_loss_trains_toward_the_labels_not_the_text(target):
    drafter, tokens, features = drafter_and_sequence(target, block_size=4, seed=0)
    anchors = [10, 20, 30]
    with torch.no_grad():
        default, _ = block_loss(drafter, target, tokens, features, anchors)
        same, _ = block_loss(drafter, target, tokens, features, anchors, labels=tokens)
        other, _ = block_loss(drafter, target, tokens, features, anchors, labels=(tokens + 1) % 90)
    assert float(same) == pytest.approx(float(default)) and float(other) != pytest.approx(float(default))


def test_slots_after_text_the_target_would_not_write_carry_no_loss(target):
    drafter, tokens, features = drafter_and_sequence(target, block_size=5, seed=1)
    anchors = [10, 20]
    labels = tokens.clone()
    labels[[12, 22]] = (tokens[[12, 22]] + 1) % 90         # slot 2 of each block: the text departs from the target

    def loss_with(changed_positions):
        changed = labels.clone()
        changed[changed_positions] = (changed[changed_positions] + 7) % 90
        with torch.no_grad():
            return float(block_loss(drafter, target, tokens, features, anchors, changed)[0])

    base = loss_with([])
    assert loss_with([13, 14, 23, 24]) == pytest.approx(base)   # slots 3, 4: after the departure, ignored
    assert loss_with([12]) != pytest.approx(base)               # slot 2 itself still counts
    assert loss_with([11]) != pytest.approx(base)               # and slot 1
    with torch.no_grad():                                       # self-distilled text: every slot counts
        own = float(block_loss(drafter, target, tokens, features, anchors)[0])
        moved = tokens.clone()
        moved[[13, 23]] = (moved[[13, 23]] + 7) % 90
        assert float(block_loss(drafter, target, tokens, features, anchors, moved)[0]) != pytest.approx(own)
    # The anchor (slot 0) never gates: decoding always drafts from a token the target chose.
    path = on_target_path(torch.tensor([[5, 1, 2, 3], [5, 1, 9, 3]]), torch.tensor([[6, 1, 2, 0], [6, 1, 2, 3]]))
    assert path.tolist() == [[True, True, True], [True, True, False]]


def test_data_mix_indexes_its_parts_in_order():
    def part(n, start, labels=None):
        tokens = [[start + i] * 5 for i in range(n)]
        feats = np.arange(n * 5 * 2, dtype=np.float16).reshape(n * 5, 2) + start
        return DistillData([1] * n, tokens, ["chat"] * n, np.arange(0, n * 5 + 1, 5), feats, labels)

    a, b = part(2, 0), part(3, 10, labels=[[7] * 5] * 3)
    mix = DataMix([a, b])
    assert len(mix) == 5 and mix.num_tokens == 25 and mix.tokens[2] == [10] * 5
    assert mix.sequence_labels(1) == [1] * 5 and mix.sequence_labels(4) == [7] * 5
    assert torch.equal(mix.sequence_features(3), b.sequence_features(1))


def test_shares_set_how_often_each_part_is_drawn():
    def part(n):
        return DistillData([1] * n, [[1] * 5] * n, ["chat"] * n, np.arange(0, n * 5 + 1, 5),
                           np.zeros((n * 5, 2), np.float16))

    small, large = part(2), part(18)
    usable = list(range(20))
    uniform = DataMix([small, large])
    assert uniform.weights is None and large.weights is None
    picks = pick_sequences(usable, uniform.weights, 4, random.Random(0))
    assert len(set(picks)) == 4                                  # unweighted: distinct sequences
    mix = DataMix([small, large], shares=[0.5, 0.5])
    rng = random.Random(0)
    draws = [i for _ in range(2000) for i in pick_sequences(usable, mix.weights, 4, rng)]
    from_small = sum(i < 2 for i in draws) / len(draws)
    assert 0.47 < from_small < 0.53                              # half of the draws, from 10% of the sequences
    assert pick_sequences([5, 6], mix.weights, 3, rng) and set(pick_sequences([5, 6], mix.weights, 50, rng)) == {5, 6}
    with pytest.raises(ValueError, match="one non-negative number per part"):
        DataMix([small, large], shares=[1.0])
