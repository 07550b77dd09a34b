"""MXFP4 checkpoints on disk: `ultraspeed quantize` round trip, gpt-oss-style expert checkpoints, and clear errors
for damaged ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import TINY_CONFIGS
from tests.quant.tiny import logits, same_bits, token_ids
from ultraspeed.cli import main
from ultraspeed.config import config_from_hf
from ultraspeed.errors import UltraSpeedError
from ultraspeed.loader import load_model
from ultraspeed.models.moe import Experts
from ultraspeed.quant.apply import MXFP4Experts, fake_quantize_experts, set_kernel
from ultraspeed.quant.checkpoint import hf_config_dict
from ultraspeed.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from ultraspeed.quant.qat import fake_quant_linear_weight


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    """(source dir, `ultraspeed quantize` output dir) for a tiny Qwen3-MoE."""
    source = tiny_dir("qwen3_moe")
    out = tmp_path_factory.mktemp("q") / "mxfp4"
    assert main(["quantize", "--format", "mxfp4", str(source), str(out)]) == 0
    return source, out


def test_quantize_cli_round_trip(quantized):
    source, out = quantized
    reference = load_model(source).model
    fake_quantize_experts(reference, "mse")    # what the checkpoint must reproduce (the CLI's default rule)
    loaded = load_model(out)
    set_kernel(loaded.model, False)
    assert isinstance(loaded.model.layers[1].mlp.experts, MXFP4Experts)
    ids = token_ids(4)
    assert torch.equal(logits(loaded.model, ids), logits(reference, ids))

    tensors = load_file(str(out / "model.safetensors"))
    blocks = tensors["model.layers.1.mlp.experts.gate_up_proj_blocks"]
    scales = tensors["model.layers.1.mlp.experts.gate_up_proj_scales"]
    assert blocks.dtype == scales.dtype == torch.uint8
    assert blocks.shape == (6, 64, 2, 16) and scales.shape == (6, 64, 2)   # [E, 2I, H/32, 16], gpt-oss layout
    assert tensors["model.layers.1.mlp.experts.down_proj_blocks"].shape == (6, 64, 1, 16)
    assert tensors["model.layers.0.mlp.gate_up_proj.weight"].dtype == torch.float32  # dense layer 0 kept
    assert not any(k.endswith("_blocks") and "experts" not in k for k in tensors)

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config_from_hf(config) == load_model(source).config
    assert json.loads((out / "tokenizer_config.json").read_text()).keys() >= {"chat_template", "eos_token"}
    assert loaded.tokenizer.encode("abcabd") == load_model(source).tokenizer.encode("abcabd")


def test_load_dequantized(quantized):
    source, out = quantized
    dense = load_model(out, dequantize=True).model
    assert type(dense.layers[1].mlp.experts) is Experts
    original = load_model(source).model
    expected = fake_quant_linear_weight(original.layers[1].mlp.experts.gate_up_proj, "mse")
    assert same_bits(dense.layers[1].mlp.experts.gate_up_proj, expected)
    fake_quantize_experts(original, "mse")
    ids = token_ids(5)
    assert torch.equal(logits(dense, ids), logits(original, ids))


def test_requantizing_a_packed_checkpoint_is_lossless(quantized, tmp_path):
    _, out = quantized
    again = tmp_path / "again"
    assert main(["quantize", "--format", "mxfp4", str(out), str(again)]) == 0
    first, second = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        if key.endswith("_blocks"):   # same values; bytes may differ (ceil can leave a 3X block max, see mxfp4.py)
            name = key.removesuffix("_blocks")
            assert same_bits(dequantize_mxfp4(first[key], first[f"{name}_scales"]),
                             dequantize_mxfp4(second[key], second[f"{name}_scales"]))
        elif not key.endswith("_scales"):
            assert torch.equal(first[key], second[key])


def test_gpt_oss_style_expert_checkpoint(tiny_dir, tmp_path):
    """Stacked `mlp.experts.{gate_up,down}_proj_{blocks,scales}` (gpt-oss names and layout) in place of HF's
    per-expert tensors, checked against transformers running the decoded weights."""
    from transformers import AutoModelForCausalLM

    source = tiny_dir("qwen3_moe")
    tensors = load_file(str(source / "model.safetensors"))
    dense_reference = dict(tensors)
    for layer in (1, 2):
        prefix = f"model.layers.{layer}.mlp.experts"
        per_expert = {k: tensors.pop(k) for k in list(tensors) if k.startswith(prefix + ".")}
        gate_up = torch.stack([torch.cat([per_expert[f"{prefix}.{e}.gate_proj.weight"],
                                          per_expert[f"{prefix}.{e}.up_proj.weight"]]) for e in range(6)])
        down = torch.stack([per_expert[f"{prefix}.{e}.down_proj.weight"] for e in range(6)])
        for name, weight in (("gate_up_proj", gate_up), ("down_proj", down)):
            blocks, scales = quantize_mxfp4(weight, "floor")   # any producer's rule: decoding is unambiguous
            tensors[f"{prefix}.{name}_blocks"], tensors[f"{prefix}.{name}_scales"] = blocks, scales
            decoded = dequantize_mxfp4(blocks, scales)
            for e in range(6):
                if name == "gate_up_proj":
                    dense_reference[f"{prefix}.{e}.gate_proj.weight"] = decoded[e, :32]
                    dense_reference[f"{prefix}.{e}.up_proj.weight"] = decoded[e, 32:]
                else:
                    dense_reference[f"{prefix}.{e}.down_proj.weight"] = decoded[e]
    packed_dir, dense_dir = tmp_path / "packed", tmp_path / "dense"
    for directory, state in ((packed_dir, tensors), (dense_dir, dense_reference)):
        shutil.copytree(source, directory)
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

    ours = load_model(packed_dir).model
    assert isinstance(ours.layers[2].mlp.experts, MXFP4Experts)
    hf = AutoModelForCausalLM.from_pretrained(dense_dir, attn_implementation="eager").float().eval()
    ids = token_ids(6)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-4, atol=1e-4)
    set_kernel(ours, False)
    assert torch.equal(logits(load_model(packed_dir, dequantize=True).model, ids), logits(ours, ids))


def corrupt(name: str, tensors: dict) -> None:
    key = "model.layers.1.mlp.experts.gate_up_proj"
    if name == "missing_scales":
        del tensors[f"{key}_scales"]
    elif name == "float_blocks":
        tensors[f"{key}_blocks"] = tensors[f"{key}_blocks"].float()
    elif name == "ragged_scales":
        tensors[f"{key}_scales"] = tensors[f"{key}_scales"][:, :, :1].contiguous()
    elif name == "wrong_expert_count":
        tensors[f"{key}_blocks"] = tensors[f"{key}_blocks"][:5].contiguous()
        tensors[f"{key}_scales"] = tensors[f"{key}_scales"][:5].contiguous()
    elif name == "nan_scale":
        tensors[f"{key}_scales"][0, 0, 0] = 0xFF


@pytest.mark.parametrize("damage, message", [
    ("truncated", "corrupt or truncated"),
    ("missing_scales", "gate_up_proj_blocks but no .*gate_up_proj_scales"),
    ("float_blocks", "must be uint8"),
    ("ragged_scales", "do not form"),
    ("wrong_expert_count", r"gate_up_proj_blocks: checkpoint shape \(5, 64, 2, 16\)"),
    ("nan_scale", "NaN byte 0xFF"),
])
def test_damaged_checkpoint_is_a_clear_error(quantized, tmp_path, capsys, damage, message):
    _, out = quantized
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = broken / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    else:
        tensors = load_file(str(weights))
        corrupt(damage, tensors)
        save_file(tensors, str(weights))
    with pytest.raises(UltraSpeedError, match=message):
        load_model(broken)
    assert main(["quantize", "--format", "mxfp4", str(broken), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("ultraspeed: error: ")


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "qwen3", "qwen3_moe", "mixtral"])
def test_written_config_reads_back(name):
    kwargs = dict(TINY_CONFIGS[name])
    from transformers import AutoConfig
    config = config_from_hf(AutoConfig.for_model(kwargs.pop("model_type", name), **kwargs).to_dict())
    back = config_from_hf(hf_config_dict(config))
    if not config.num_experts:   # MoE-only fields are unused by dense models and defaulted on read
        back = back.replace(moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob)
    assert back == config


def test_refuses_to_mix_into_a_directory_with_other_weights(quantized, tmp_path, capsys):
    source, _ = quantized
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert main(["quantize", "--format", "mxfp4", str(source), str(out)]) == 2
    assert "already holds other weight files" in capsys.readouterr().err
