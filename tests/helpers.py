"""Tiny random models built offline with transformers (the numerical oracle), saved as real checkpoints."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from ultraspeed.config import config_from_hf
from ultraspeed.loader import build_decoder, read_safetensors_dir

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)

DEEPSEEK = dict(num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
                n_shared_experts=1, first_k_dense_replace=1, moe_intermediate_size=32, routed_scaling_factor=2.5,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)

# name -> transformers config kwargs; `model_type` names the architecture where the name is a variant.
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
    # MLA with a query bottleneck, interleaved yarn rope (mscale in the softmax scale), grouped sigmoid routing.
    "deepseek_v3": dict(TINY, **DEEPSEEK, q_lora_rank=48, rope_interleave=True,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                                         "mscale_all_dim": 0.8, "original_max_position_embeddings": 64}),
    # MLA with a plain query projection and rotate-half rope.
    "deepseek_v3-no_q_lora": dict(TINY, **DEEPSEEK, model_type="deepseek_v3", q_lora_rank=None,
                                  rope_interleave=False),
    # Global / sliding (window 5) layers with their own ropes, doubled KV heads and sinks on the sliding ones.
    "mimo_v2_flash": dict(TINY, num_key_value_heads=1, head_dim=24, v_head_dim=16, attention_bias=True,
                          sliding_window=5, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                          mlp_layer_types=["dense", "sparse", "sparse"], attention_value_scale=0.6,
                          n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
                          topk_group=1, rope_parameters={
                              "full_attention": {"rope_type": "default", "rope_theta": 5e6,
                                                 "partial_rotary_factor": 0.334},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4,
                                                    "partial_rotary_factor": 0.334}}),
}


def hf_model(name: str, seed: int = 0, **overrides):
    """A random transformers model for TINY_CONFIGS[name] with non-trivial norms, biases, sinks and router
    load-balancing biases (so they are really tested)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    kwargs = {**TINY_CONFIGS[name], **overrides}
    cfg = AutoConfig.for_model(kwargs.pop("model_type", name), **kwargs)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith("norm.weight") or "layernorm" in param_name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "bias" in param_name:
                p.copy_(0.1 * torch.randn_like(p))
            elif "sinks" in param_name:
                p.copy_(torch.randn_like(p))
        for buffer_name, b in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                # Comparable to the spread of the sigmoid scores, so it changes which experts win; shifted below
                # zero (routing ignores the shift) so that experts of dropped groups must lose to negative scores.
                b.copy_(0.05 * torch.randn_like(b) - 0.5)
    return model


def save_checkpoint(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def char_tokenizer(directory: Path) -> None:
    """One token per printable ASCII character (ids 0..94), written as tokenizer.json: a checkpoint directory
    with it runs through the CLI."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=" "))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(directory / "tokenizer.json"))


def ours_from_hf(model, directory: Path, dtype=torch.float32):
    save_checkpoint(model, directory)
    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    return build_decoder(config, read_safetensors_dir(directory), dtype)


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


class Collector:
    """Gathers one engine request's updates (engine/scheduler.py) and signals its final one."""

    def __init__(self):
        self.tokens, self.updates, self.final, self.done = [], [], None, threading.Event()

    def __call__(self, update):
        assert not self.done.is_set(), "update after the final one"
        self.updates.append(update)
        self.tokens += update.token_ids
        if update.done:
            self.final = update
            self.done.set()


def run_requests(engine, requests, timeout=60):
    """Submit EngineRequests together, wait for each one's final update; -> their Collectors, in order."""
    collectors = [Collector() for _ in requests]
    for r, c in zip(requests, collectors):
        r.on_update = c
    engine.submit(requests)
    for c in collectors:
        assert c.done.wait(timeout)
    return collectors
