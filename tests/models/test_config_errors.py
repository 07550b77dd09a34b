"""Configs: unsupported models fail with a clear UltraSpeedError, and configs survive their round trips (HF config
object -> config.json -> ModelConfig, ModelConfig.replace) with the per-layer facts transformers derives."""

import json

import pytest

from tests.helpers import TINY_CONFIGS
from ultraspeed.config import ModelConfig, config_from_gguf, config_from_hf
from ultraspeed.errors import UltraSpeedError
from ultraspeed.loader import load_model

MINIMAL = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)


def test_unknown_hf_architecture_is_named():
    with pytest.raises(UltraSpeedError, match=r"unknown architecture 'gpt2'.*supported: llama"):
        config_from_hf(dict(MINIMAL, model_type="gpt2"))


def test_missing_model_type_is_named():
    with pytest.raises(UltraSpeedError, match="model_type"):
        config_from_hf(MINIMAL)


def test_unknown_gguf_architecture_is_named():
    with pytest.raises(UltraSpeedError, match=r"unknown GGUF architecture 'falcon'"):
        config_from_gguf({"general.architecture": "falcon"})


def test_unknown_architecture_in_model_config():
    with pytest.raises(UltraSpeedError, match="unknown architecture 'bert'"):
        ModelConfig(arch="bert", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                    num_kv_heads=2, head_dim=8)


def test_load_model_reports_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(MINIMAL, model_type="t5")))
    with pytest.raises(UltraSpeedError, match="unknown architecture 't5'"):
        load_model(tmp_path)


def test_layer_types_must_cover_every_layer():
    with pytest.raises(UltraSpeedError, match="one entry per layer"):
        config_from_hf(dict(MINIMAL, model_type="qwen2", layer_types=["full_attention"]))


def test_replace_round_trips_and_validates():
    config = config_from_hf(dict(MINIMAL, model_type="llama"))
    assert config.replace() == config
    assert config.replace(tie_word_embeddings=True) == config_from_hf(dict(MINIMAL, model_type="llama",
                                                                            tie_word_embeddings=True))
    with pytest.raises(UltraSpeedError, match="one entry per layer"):
        config.replace(num_layers=3)          # the per-layer types still describe two layers
    with pytest.raises(UltraSpeedError, match="unknown architecture"):
        config.replace(arch="gpt2")


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_hf_config_round_trips_through_config_json(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(TINY_CONFIGS[name])
    hf = transformers.AutoConfig.for_model(kwargs.pop("model_type", name), **kwargs)
    hf.save_pretrained(tmp_path)
    ours = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert ours == config_from_hf(hf.to_dict())
    assert ours.replace() == ours
    assert ours.num_layers == hf.num_hidden_layers and ours.vocab_size == hf.vocab_size
    assert list(ours.layer_types) == list(getattr(hf, "layer_types", None) or ours.layer_types)
    if getattr(hf, "mlp_layer_types", None):
        assert list(ours.mlp_layer_types) == list(hf.mlp_layer_types)


def test_mimo_defaults_match_transformers():
    """A bare MiMo config.json gets what transformers derives: layer pattern, dense first layer, window + 1,
    value scale and a third of each head rotated."""
    transformers = pytest.importorskip("transformers")
    raw = dict(MINIMAL, model_type="mimo_v2_flash", num_hidden_layers=12, num_key_value_heads=1, head_dim=24,
               v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, sliding_window_size=4)
    hf = transformers.AutoConfig.for_model(**raw)
    ours = config_from_hf(raw)
    assert list(ours.layer_types) == hf.layer_types
    assert list(ours.mlp_layer_types) == hf.mlp_layer_types
    assert ours.sliding_window == hf.sliding_window == 5
    assert ours.attention_value_scale == hf.attention_value_scale
    assert ours.rope.partial_rotary_factor == pytest.approx(0.334)
    assert ours.kv_heads("sliding_attention") == 2 and ours.kv_heads("full_attention") == 1
    assert ours.sink_layer_types == ("sliding_attention",)


def test_deepseek_layers_follow_first_k_dense_replace():
    ours = config_from_hf(dict(MINIMAL, model_type="deepseek_v3", num_hidden_layers=4, first_k_dense_replace=1,
                               n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=8, q_lora_rank=None,
                               qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))
    assert ours.mlp_layer_types == ("dense", "sparse", "sparse", "sparse")
    assert ours.is_mla and ours.head_dim == 12 and ours.q_lora_rank is None
    assert ours.rope.interleaved   # DeepSeek's default
