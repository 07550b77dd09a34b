"""The drafter trainer on a tiny random target: anchors stay inside the response, training lowers the block loss
and resumes from its checkpoint, and self-distillation data is built in shards that an interrupted or a larger
run reuses, with the same result as an uninterrupted run."""

from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import hf_model, ours_from_hf
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter, init_from_target, init_random
from ultraspeed.train import distill_data
from ultraspeed.train.distill_data import DistillData, DistillSpec, build_or_load
from ultraspeed.train.drafter import TrainConfig, block_loss, sample_anchors, train

pytest.importorskip("transformers")
VOCAB, EOS = 96, 95


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    torch.set_num_threads(1)
    return ours_from_hf(hf_model("qwen2", seed=5, vocab_size=VOCAB, eos_token_id=EOS, bos_token_id=EOS),
                        tmp_path_factory.mktemp("target")).requires_grad_(False)


def test_anchors_leave_room_for_a_full_block_inside_the_response():
    rng = random.Random(0)
    for prompt_len, seq_len, block in [(5, 30, 4), (1, 9, 8), (12, 40, 16)]:
        anchors = sample_anchors(prompt_len, seq_len, block, 6, rng)
        assert anchors == sorted(set(anchors)) and anchors
        assert all(prompt_len - 1 <= a <= seq_len - block for a in anchors)
    assert sample_anchors(10, 12, 4, 6, rng) == []          # response too short for one block


def toy_data(target, drafter, n_seqs=6, length=48, prompt_len=8) -> DistillData:
    """Sequences the target itself would write: a repeating pattern the drafter can learn quickly."""
    g = torch.Generator().manual_seed(1)
    tokens, feats = [], []
    for _ in range(n_seqs):
        period = torch.randint(1, 90, (5,), generator=g)
        seq = period.repeat(length // 5 + 1)[:length].tolist()
        with torch.inference_mode():
            _, captured = target(torch.tensor([seq]), target.new_cache(1, length), drafter.config.target_layer_ids)
        tokens.append(seq)
        feats.append(torch.cat(captured, dim=-1)[0].numpy().astype(np.float16))
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(np.int64)
    return DistillData([prompt_len] * n_seqs, tokens, ["chat"] * n_seqs, offsets, np.concatenate(feats))


def eval_loss(drafter, target, data) -> float:
    rng = random.Random(123)
    with torch.no_grad():
        losses = [block_loss(drafter, target, torch.tensor(t), data.sequence_features(i),
                             sample_anchors(data.prompt_lens[i], len(t), drafter.config.block_size, 8, rng))[0]
                  for i, t in enumerate(data.tokens)]
    return float(torch.stack(losses).mean())


def test_training_lowers_the_block_loss_and_resumes(target, tmp_path):
    config = DFlashConfig.for_target(target.config, num_layers=1, num_features=2, block_size=4)
    drafter = DFlashDrafter(config)
    init_random(drafter, 0)
    init_from_target(drafter, target)
    data = toy_data(target, drafter)
    before = eval_loss(drafter, target, data)
    cfg = TrainConfig(steps=60, seqs_per_step=2, anchors_per_seq=8, checkpoint_every=10, lr_muon=0.02,
                      lr_adam=0.01)
    train(drafter, target, data, cfg, tmp_path, log=lambda m: None)
    after = eval_loss(drafter, target, data)
    assert after < 0.75 * before, (before, after)
    assert (tmp_path / "drafter.safetensors").exists()
    # A longer run in the same directory resumes at the checkpoint instead of starting over.
    logs = []
    resumed = DFlashDrafter(config)
    train(resumed, target, data, replace(cfg, steps=65), tmp_path, log=logs.append)
    assert logs[0].startswith("resumed") and "at step 60" in logs[0]
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == 65


def test_distillation_data_is_built_in_shards_that_survive_interruptions_and_growth(target, tmp_path,
                                                                                   monkeypatch):
    class Tok:
        stop_token_ids = (EOS,)

        def encode_chat(self, messages):
            return [ord(c) % 90 + 1 for c in messages[0]["content"]]

    prompts = {"chat": [[{"role": "user", "content": f"prompt {i} " + "x" * (i % 5)}] for i in range(18)]}
    monkeypatch.setattr(distill_data, "domain_prompts", lambda domain, split, count: prompts[domain][:count])
    loaded = SimpleNamespace(model=target, tokenizer=Tok())
    spec = DistillSpec(counts=(("chat", 13),), max_new_tokens=6, target_layer_ids=(0, 1))

    clean = build_or_load(loaded, spec, tmp_path / "clean", batch=2, shard_size=5)   # [0, 5) [5, 10) [10, 13)

    real, calls = distill_data.generate_batch, []

    def fail_on_second_shard(model, todo, *args, **kw):
        calls.append(len(todo))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, todo, *args, **kw)
    monkeypatch.setattr(distill_data, "generate_batch", fail_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_or_load(loaded, spec, tmp_path / "resumed", batch=2, shard_size=5)
    calls.clear()
    monkeypatch.setattr(distill_data, "generate_batch", lambda *a, **kw: (calls.append(len(a[1])), real(*a, **kw))[1])
    resumed = build_or_load(loaded, spec, tmp_path / "resumed", batch=2, shard_size=5)
    assert calls == [5, 3]                       # the first shard was kept; the interrupted one is redone
    assert resumed.tokens == clean.tokens and resumed.prompt_lens == clean.prompt_lens
    assert resumed.domains == ["chat"] * 13
    same = [np.array_equal(resumed.sequence_features(i).numpy(), clean.sequence_features(i).numpy())
            for i in range(13)]
    assert all(same)

    calls.clear()
    grown = build_or_load(loaded, replace(spec, counts=(("chat", 18),)), tmp_path / "resumed", batch=2, shard_size=5)
    assert calls == [5, 3]                       # [10, 15) and [15, 18): the two full shards are reused
    assert grown.tokens[:10] == clean.tokens[:10] and len(grown) == 18


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_drafter_and_damage_is_one_clear_error(target, tmp_path):
    from ultraspeed.errors import UltraSpeedError
    config = DFlashConfig.for_target(target.config, num_layers=1, num_features=2, block_size=4)

    def fresh():
        drafter = DFlashDrafter(config)
        init_random(drafter, 0)
        init_from_target(drafter, target)
        return drafter

    data = toy_data(target, fresh(), n_seqs=4)
    cfg = TrainConfig(steps=6, seqs_per_step=2, anchors_per_seq=4, checkpoint_every=3)
    straight = train(fresh(), target, data, cfg, tmp_path / "straight", log=lambda m: None)

    def killed_after_step_3(message):
        if message.startswith("step 3:"):            # logged once the step-3 checkpoint is saved
            raise Interrupted
    with pytest.raises(Interrupted):
        train(fresh(), target, data, cfg, tmp_path / "resumed", log=killed_after_step_3)
    resumed = train(fresh(), target, data, cfg, tmp_path / "resumed", log=lambda m: None)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list((tmp_path / "resumed").glob("*.tmp"))

    (tmp_path / "resumed" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UltraSpeedError, match="checkpoint.pt: cannot resume"):
        train(fresh(), target, data, replace(cfg, steps=7), tmp_path / "resumed", log=lambda m: None)

    broken = DistillData(data.prompt_lens, data.tokens, data.domains, data.offsets,
                         np.full_like(data.features, np.nan))
    with pytest.raises(UltraSpeedError, match="training loss is nan"):
        train(fresh(), target, broken, cfg, tmp_path / "nan", log=lambda m: None)
    assert not (tmp_path / "nan" / "drafter.safetensors").exists()


def test_the_draft_vocabulary_has_exactly_the_size_asked_for():
    from ultraspeed.train.drafter import frequent_tokens
    ids = frequent_tokens([[5, 5, 7], [7, 7, 9]], 12, always=(3,))
    assert len(ids) == 12 and ids.unique().numel() == 12 and {3, 5, 7, 9} <= set(ids.tolist())


def test_a_damaged_data_shard_is_rebuilt(tmp_path, capsys):
    spec = TrainConfig()
    (tmp_path / "sequences.pt").write_bytes(b"garbage")
    np.save(tmp_path / "features.npy", np.zeros((3, 4), dtype=np.float16))
    assert distill_data.load_cached(tmp_path, spec)[1] is None
    assert "cannot be read" in capsys.readouterr().err
    torch.save({"spec": distill_data.load_cached(tmp_path, spec)[0], "prompt_lens": [1], "tokens": [[1, 2]],
                "domains": ["chat"]}, tmp_path / "sequences.pt")           # 2 tokens, but 3 rows of features
    assert distill_data.load_cached(tmp_path, spec)[1] is None
