"""Models with random weights in real shapes: for benchmarks and compile checks that need a model's shapes but
not its knowledge (scripts/gpu_bench.py, kernels/triton_aot.py), and a twin of the default model where its
checkpoint is not installed."""

from __future__ import annotations

import torch

from ultraspeed.config import ModelConfig, RopeConfig
from ultraspeed.models.decoder import Decoder
from ultraspeed.models.dflash import DFlashConfig, DFlashDrafter


def qwen3_30b_a3b_config(num_layers: int = 48, max_position: int = 4096) -> ModelConfig:
    """Qwen3-30B-A3B's shapes (config.json of the release), with `num_layers` layers."""
    return ModelConfig(arch="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_layers=num_layers, num_heads=32, num_kv_heads=4, head_dim=128, rms_eps=1e-6,
                       max_position=max_position, qk_norm=True, rope=RopeConfig(theta=1e6), num_experts=128,
                       num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True)


def smollm2_135m_config(max_position: int = 8192, num_layers: int = 30) -> ModelConfig:
    """The default model's shapes, for its random twin when the checkpoint is not installed."""
    return ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=num_layers,
                       num_heads=9, num_kv_heads=3, head_dim=64, rms_eps=1e-5, max_position=max_position,
                       tie_word_embeddings=True, rope=RopeConfig(theta=100000.0))


def random_decoder(config: ModelConfig, device: torch.device | str, dtype: torch.dtype, mxfp4_experts: bool = True,
                   seed: int = 0, std: float = 0.02) -> Decoder:
    """A Decoder with random weights built straight on `device` (no dense expert tensors are ever allocated when
    the experts are MXFP4): norms near one, matrices N(0, std), packed experts with random codes and scales
    that give them about the same spread."""
    from ultraspeed.quant.apply import packed_placeholders
    with torch.device("meta"):
        model = Decoder(config, dtype)
    if config.is_moe and mxfp4_experts:
        packed_placeholders(model, {f"layers.{i}.mlp.experts.{p}" for i, kind in enumerate(config.mlp_layer_types)
                                    if kind == "sparse" for p in ("gate_up_proj", "down_proj")})
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device, dtype=torch.float32))
            elif "correction_bias" in name:
                p.zero_()
            else:
                p.copy_(std * torch.randn(p.shape, generator=g, device=device, dtype=torch.float32))
        for name, b in model.named_buffers():
            if name.endswith("_blocks"):
                b.copy_(torch.randint(0, 256, b.shape, generator=g, device=device, dtype=torch.uint8))
            elif name.endswith("_scales"):
                # E2M1 magnitudes average ~2.6, so 2^-7 puts the weights near std 0.02.
                b.copy_(torch.randint(119, 122, b.shape, generator=g, device=device, dtype=torch.uint8))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.requires_grad_(False).eval()


def random_drafter(target: Decoder, device: torch.device | str, dtype: torch.dtype, block_size: int,
                   num_layers: int = 2, seed: int = 1) -> DFlashDrafter:
    # Five target features as DFlash uses, fewer for shallow targets (the default spacing needs L > 4 per feature).
    num_features = min(5, max(1, target.config.num_layers - 4))
    config = DFlashConfig.for_target(target.config, num_layers=num_layers, num_features=num_features,
                                     block_size=block_size)
    with torch.device(device):
        drafter = DFlashDrafter(config)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g, device=device))
    return drafter.to(dtype).requires_grad_(False).eval()
