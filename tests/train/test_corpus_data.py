"""Teacher-forced drafter data from existing text: every label is the target's own greedy prediction at that
position, the features are the target's, the cache is reused, and it trains beside self-distilled data."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_random
from ultraspeed.train import corpus_data
from ultraspeed.train.corpus_data import CorpusSpec, build_or_load_corpus
from ultraspeed.train.distill_data import DataMix, DistillData
from ultraspeed.train.drafter import block_loss

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


def conversations(n):
    return [("chat", [{"role": "user", "content": f"question {i}"},
                      {"role": "assistant", "content": f"an answer of some length, number {i} " * 3}])
            for i in range(n)]


def test_labels_are_the_targets_greedy_predictions(target, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_data, "corpus_conversations", lambda spec: conversations(3))
    loaded = SimpleNamespace(model=target, tokenizer=Tok())
    spec = CorpusSpec(chat=3, code=0, max_tokens=60, target_layer_ids=LAYERS)
    data = build_or_load_corpus(loaded, spec, tmp_path)
    assert len(data) == 3 and all(len(t) == 60 for t in data.tokens)
    assert data.prompt_lens == [len(Tok().encode_chat(m[:1])) for _, m in conversations(3)]
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
    assert again.tokens == data.tokens and again.labels == data.labels


def test_block_loss_trains_toward_the_labels_not_the_text(target):
    drafter = DFlashDrafter(DFlashConfig.for_target(target.config, num_layers=1, num_features=2, block_size=4))
    init_random(drafter, 0)
    tokens = torch.randint(1, 90, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, captured = target(tokens.view(1, -1), target.new_cache(1, 40), drafter.config.target_layer_ids)
    features = torch.cat(captured, -1)[0]
    anchors = [10, 20, 30]
    with torch.no_grad():
        default, _ = block_loss(drafter, target, tokens, features, anchors)
        same, _ = block_loss(drafter, target, tokens, features, anchors, labels=tokens)
        other, _ = block_loss(drafter, target, tokens, features, anchors, labels=(tokens + 1) % 90)
    assert float(same) == pytest.approx(float(default)) and float(other) != pytest.approx(float(default))


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
