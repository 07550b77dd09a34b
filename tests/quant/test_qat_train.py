"""QAT training loop (ultraspeed.train.qat): only expert weights train, training resumes exactly, and the exported
checkpoint decodes to the last training forward's weights bit for bit."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.quant.tiny import logits, same_bits, token_ids
from ultraspeed.loader import LoadedModel, load_model
from ultraspeed.quant.apply import MXFP4Experts, MXFP4Linear, expert_targets, set_kernel
from ultraspeed.quant.checkpoint import quantization_config, save_mxfp4_checkpoint
from ultraspeed.quant.qat import fake_quant_linear_weight
from ultraspeed.train.qat import QATConfig, master_weights, export_qat, train_qat
from ultraspeed.train.text_corpus import token_windows

# A large learning rate so that three steps move many weights across quantization thresholds.
CFG = QATConfig(steps=3, lr=3e-3, seq_len=16, seqs_per_step=2, checkpoint_every=2, scale_rule="even")


def windows() -> list[list[int]]:
    return token_windows(token_ids(7, batch=10, length=20).tolist(), CFG.seq_len, separator=0)


def quiet(_message: str) -> None:
    pass


@pytest.mark.parametrize("arch", ["qwen3_moe", "llama"])
def test_export_is_bit_identical_to_the_trained_fake_quant_weights(tiny_dir, tmp_path, arch):
    loaded = load_model(tiny_dir(arch))
    original = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    student = train_qat(loaded.model, copy.deepcopy(loaded.model), windows(), CFG, tmp_path / "run", quiet)

    masters = master_weights(student)
    assert masters and all(not torch.equal(p, original[n]) for n, p in masters.items())  # they trained
    frozen = {k for k in original if k not in masters}
    assert all(same_bits(student.state_dict()[k], original[k]) for k in frozen)      # nothing else did
    trained_q = {n: fake_quant_linear_weight(p, CFG.scale_rule).detach() for n, p in masters.items()}
    ids = token_ids(8)
    trained_logits = logits(student, ids)

    export_qat(student, CFG.scale_rule)
    out = save_mxfp4_checkpoint(LoadedModel(loaded.config, student, loaded.tokenizer, loaded.source),
                                tmp_path / "run", quantization_config(CFG.scale_rule))
    exported = load_model(out)
    for name, q in trained_q.items():
        module_name, _, leaf = name.rpartition(".")
        module = exported.model.get_submodule(module_name)
        assert isinstance(module, MXFP4Experts if arch == "qwen3_moe" else MXFP4Linear)
        packed = module.packed()[leaf] if isinstance(module, MXFP4Experts) else module.packed()
        assert same_bits(packed.dequantize(q.dtype), q), name
    state = exported.model.state_dict()
    assert all(same_bits(state[k], original[k]) for k in frozen)
    set_kernel(exported.model, False)
    assert torch.equal(logits(exported.model, ids), trained_logits)
    assert len(expert_targets(exported.model)) == len(expert_targets(student))


def test_resume_continues_exactly(tiny_dir, tmp_path):
    loaded = load_model(tiny_dir("qwen3_moe"))
    teacher = copy.deepcopy(loaded.model)
    straight = train_qat(copy.deepcopy(loaded.model), teacher, windows(), CFG, tmp_path / "straight", quiet)
    # Stop after the step-2 checkpoint, then resume with a fresh model and optimizer.
    train_qat(copy.deepcopy(loaded.model), teacher, windows(), dataclasses.replace(CFG, steps=2),
              tmp_path / "resumed", quiet)
    messages = []
    resumed = train_qat(copy.deepcopy(loaded.model), teacher, windows(), CFG, tmp_path / "resumed", messages.append)
    assert any("resumed" in m and "step 2" in m for m in messages)
    a, b = master_weights(straight), master_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_resume_with_other_settings_or_a_damaged_state_is_refused(tiny_dir, tmp_path):
    from ultraspeed.errors import UltraSpeedError
    from ultraspeed.train.qat import STATE_FILE
    loaded = load_model(tiny_dir("qwen3_moe"))
    teacher = copy.deepcopy(loaded.model)
    train_qat(copy.deepcopy(loaded.model), teacher, windows(), dataclasses.replace(CFG, steps=2), tmp_path, quiet)
    for changed in (dict(lr=1e-3), dict(scale_rule="ceil"), dict(seq_len=8), dict(source="/another/model")):
        with pytest.raises(UltraSpeedError, match="other settings"):
            train_qat(copy.deepcopy(loaded.model), teacher, windows(), dataclasses.replace(CFG, **changed), tmp_path,
                      quiet)
    with pytest.raises(UltraSpeedError, match="at least that"):
        train_qat(copy.deepcopy(loaded.model), teacher, windows(), dataclasses.replace(CFG, steps=1), tmp_path, quiet)
    (tmp_path / STATE_FILE).write_bytes(b"damaged")
    with pytest.raises(UltraSpeedError, match="cannot resume"):
        train_qat(copy.deepcopy(loaded.model), teacher, windows(), CFG, tmp_path, quiet)
