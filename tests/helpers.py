"""Tiny random models built offline with transformers (the numerical oracle), saved as real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ultraspeed.config import config_from_hf
from ultraspeed.loader import build_decoder, read_safetensors_dir

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(TINY, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}),
    "mistral": dict(TINY, sliding_window=7, head_dim=16),
    "qwen2": dict(TINY),
    "qwen3": dict(TINY, head_dim=16, tie_word_embeddings=True),
    "mixtral": dict(TINY, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(TINY, head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0]),
}


def hf_model(arch: str, seed: int = 0, **overrides):
    """A random transformers model of `arch` with slightly non-trivial norms (so they are really tested)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, **{**TINY_CONFIGS[arch], **overrides})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "bias" in name and "correction" not in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif "sinks" in name:
                p.copy_(torch.randn_like(p))
    return model


def save_checkpoint(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def ours_from_hf(model, directory: Path, dtype=torch.float32):
    save_checkpoint(model, directory)
    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    return build_decoder(config, read_safetensors_dir(directory), dtype)


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits
