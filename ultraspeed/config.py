"""Model configuration: one dataclass for every supported decoder family.

A family is data, not code: Llama, Mistral, Qwen2/3 (dense), Mixtral, Qwen3-MoE, DeepSeek-V3 and MiMo-V2-Flash
differ only in the switches below (biases, QK-norm, MoE routing, sliding windows, sinks), so one decoder
implementation reads them all. `from_hf` reads a Hugging Face config.json dict; `from_gguf` reads GGUF metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from ultraspeed.errors import UltraSpeedError

SUPPORTED_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "deepseek_v3", "mimo_v2_flash",
)


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"            # "default" | "llama3" | "linear" | "yarn"
    partial_rotary_factor: float = 1.0    # fraction of head_dim that rotates (MiMo rotates a third)
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # yarn (mscale / mscale_all_dim: 0 = not given, as HF distinguishes given from absent)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    interleaved: bool = False             # DeepSeek MLA checkpoints rotate interleaved pairs


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-6
    max_position: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # bias on q/k/v (Qwen2)
    o_bias: bool = False
    qk_norm: bool = False                 # RMSNorm on each q/k head (Qwen3)
    rope: RopeConfig = field(default_factory=RopeConfig)
    # Per-layer attention kind ("full_attention" | "sliding_attention") and the window for sliding layers.
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    sliding_rope: RopeConfig | None = None   # MiMo uses another rope for sliding layers
    sliding_num_kv_heads: int | None = None  # MiMo's sliding layers have twice the KV heads of its global ones
    v_head_dim: int | None = None            # MiMo/DeepSeek: values narrower than queries/keys
    sink_layer_types: tuple[str, ...] = ()   # layer types with a learned per-head sink logit (MiMo: sliding)
    attention_value_scale: float = 1.0       # MiMo scales values
    # MoE. mlp_layer_types[i] is "dense" or "sparse".
    mlp_layer_types: tuple[str, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router: str = "softmax"                 # "softmax" (Mixtral/Qwen3-MoE) | "sigmoid" (DeepSeek-V3/MiMo)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    # DeepSeek MLA (multi-head latent attention)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UltraSpeedError(
                f"unknown architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        if not self.mlp_layer_types:
            kind = "sparse" if self.num_experts else "dense"
            object.__setattr__(self, "mlp_layer_types", (kind,) * self.num_layers)
        if len(self.layer_types) != self.num_layers or len(self.mlp_layer_types) != self.num_layers:
            raise UltraSpeedError("config: layer_types / mlp_layer_types must have one entry per layer")

    @property
    def is_moe(self) -> bool:
        return "sparse" in self.mlp_layer_types

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def kv_heads(self, layer_type: str) -> int:
        if layer_type == "sliding_attention" and self.sliding_num_kv_heads:
            return self.sliding_num_kv_heads
        return self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ModelConfig(**values)


def _rope_from_hf(params: dict | None, fallback_theta: float, max_position: int,
                  partial_rotary_factor: float = 1.0) -> RopeConfig:
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    return RopeConfig(
        theta=float(params.get("rope_theta", fallback_theta)),
        rope_type=rope_type,
        partial_rotary_factor=float(params.get("partial_rotary_factor", partial_rotary_factor)),
        factor=float(params.get("factor") or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        # HF falls back to the model's context length when a scaled rope does not name its pretraining length.
        original_max_position=int(params.get("original_max_position_embeddings") or max_position),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
    )


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _moe_layer_types(arch: str, c: dict, num_layers: int, num_experts: int) -> tuple[str, ...]:
    if c.get("mlp_layer_types"):
        return tuple(c["mlp_layer_types"])
    if arch == "mixtral":
        return ("sparse",) * num_layers
    if arch == "qwen3_moe":
        step, dense_only = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or [])
        return tuple("sparse" if (i not in dense_only and num_experts and (i + 1) % step == 0)
                     else "dense" for i in range(num_layers))
    if arch == "deepseek_v3":
        first_dense = c.get("first_k_dense_replace", 3)
        return tuple("dense" if i < first_dense else "sparse" for i in range(num_layers))
    if arch == "mimo_v2_flash":
        return ("dense",) + ("sparse",) * (num_layers - 1)
    return ("dense",) * num_layers


def _layer_types(arch: str, c: dict, num_layers: int) -> tuple[str, ...]:
    if c.get("layer_types"):
        return tuple(c["layer_types"])
    window = c.get("sliding_window")
    if arch == "mistral" and window:
        return ("sliding_attention",) * num_layers
    if arch == "qwen2" and c.get("use_sliding_window") and window:
        first_sliding = c.get("max_window_layers", num_layers)
        return tuple("sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers))
    if arch == "mimo_v2_flash":   # global attention in the first and every sixth layer
        return tuple("full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention"
                     for i in range(num_layers))
    return ("full_attention",) * num_layers


def _sliding_window(c: dict) -> int | None:
    if c.get("sliding_window_size") is not None:
        # MiMo's original configs count the window without the query itself.
        return c["sliding_window_size"] + 1
    return c.get("sliding_window")


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, tokenizer_config.json, ...), or one clear error naming it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UltraSpeedError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(value, dict):
        raise UltraSpeedError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def config_from_hf_file(path: Path) -> ModelConfig:
    """config_from_hf on a config.json file, a missing or malformed field named with the file."""
    try:
        return config_from_hf(read_json_object(path))
    except (KeyError, TypeError, ValueError) as e:      # UltraSpeedError (unknown architecture) passes as is
        field_name = f"no field {e}" if isinstance(e, KeyError) else str(e)
        raise UltraSpeedError(f"{path}: not a usable model config ({field_name})") from None


def config_from_hf(c: dict) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dict."""
    arch = c.get("model_type")
    if arch is None:
        raise UltraSpeedError("config.json has no model_type, so the architecture is unknown; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UltraSpeedError(
            f"unknown architecture {arch!r} in config.json; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    num_layers = c["num_hidden_layers"]
    num_heads = c["num_attention_heads"]
    num_kv_heads = c.get("num_key_value_heads") or num_heads
    hidden = c["hidden_size"]
    mimo, deepseek = arch == "mimo_v2_flash", arch == "deepseek_v3"
    max_position = c.get("max_position_embeddings", 4096)
    rope_params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = c.get("rope_theta", 10000.0)
    partial = c.get("partial_rotary_factor") or (0.334 if mimo else 1.0)   # MiMo rotates a third by default
    sliding_rope = None
    if "full_attention" in rope_params:      # per-layer-type rope (MiMo)
        sliding_rope = _rope_from_hf(rope_params.get("sliding_attention"), theta, max_position, partial)
        rope_params = rope_params["full_attention"]
    rope = _rope_from_hf(rope_params, theta, max_position, partial)
    if deepseek:
        rope = RopeConfig(**{**rope.__dict__, "interleaved": bool(c.get("rope_interleave", True))})
    layer_types = _layer_types(arch, c, num_layers)
    num_experts = c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts") or 0
    head_dim = c.get("head_dim") or hidden // num_heads
    if deepseek:   # HF's config stores the rope width as head_dim; ours is the full query/key head
        head_dim = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    value_scale = c.get("attention_value_scale", 0.707 if mimo else None)
    return ModelConfig(
        arch=arch,
        vocab_size=c["vocab_size"],
        hidden_size=hidden,
        intermediate_size=c.get("intermediate_size", 0),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_eps=c.get("rms_norm_eps", 1e-6),
        max_position=max_position,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=bool(c.get("attention_bias", arch == "qwen2")),
        o_bias=bool(c.get("attention_bias", False)) and arch not in ("qwen2", "mimo_v2_flash"),
        qk_norm=arch in ("qwen3", "qwen3_moe"),
        rope=rope,
        layer_types=layer_types,
        sliding_window=_sliding_window(c) if "sliding_attention" in layer_types else None,
        sliding_rope=sliding_rope,
        sliding_num_kv_heads=2 * num_kv_heads if mimo else None,
        v_head_dim=c.get("v_head_dim"),
        sink_layer_types=("sliding_attention",) if mimo else (),
        attention_value_scale=float(1.0 if value_scale is None else value_scale),
        mlp_layer_types=_moe_layer_types(arch, c, num_layers, num_experts),
        num_experts=num_experts,
        num_experts_per_tok=c.get("num_experts_per_tok", 0) if num_experts else 0,
        moe_intermediate_size=c.get("moe_intermediate_size") or c.get("intermediate_size", 0),
        norm_topk_prob=bool(c.get("norm_topk_prob", arch in ("mixtral", "deepseek_v3", "mimo_v2_flash"))),
        router="sigmoid" if arch in ("deepseek_v3", "mimo_v2_flash") else "softmax",
        n_group=c.get("n_group") or 1,
        topk_group=c.get("topk_group") or 1,
        routed_scaling_factor=float(c.get("routed_scaling_factor") or 1.0),
        num_shared_experts=c.get("n_shared_experts") or 0,
        q_lora_rank=c.get("q_lora_rank") if deepseek else None,
        kv_lora_rank=(c.get("kv_lora_rank") or 0) if deepseek else 0,
        qk_nope_head_dim=c.get("qk_nope_head_dim", 0) if deepseek else 0,
        qk_rope_head_dim=c.get("qk_rope_head_dim", 0) if deepseek else 0,
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos_ids(c.get("eos_token_id")),
    )


GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                      "qwen3moe": "qwen3_moe"}


def config_from_gguf(meta: dict) -> ModelConfig:
    """Build a ModelConfig from GGUF key/value metadata (already decoded to Python values)."""
    gguf_arch = meta.get("general.architecture")
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise UltraSpeedError(
            f"unknown GGUF architecture {gguf_arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    p = gguf_arch + "."
    hidden = int(meta[p + "embedding_length"])
    num_heads = int(meta[p + "attention.head_count"])
    num_layers = int(meta[p + "block_count"])
    vocab = int(meta.get(p + "vocab_size") or len(meta["tokenizer.ggml.tokens"]))
    num_experts = int(meta.get(p + "expert_count", 0))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        arch=GGUF_ARCHITECTURES[gguf_arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(meta.get(p + "feed_forward_length", 0)),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(meta.get(p + "attention.head_count_kv", num_heads)),
        head_dim=int(meta.get(p + "attention.key_length", hidden // num_heads)),
        rms_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        max_position=int(meta.get(p + "context_length", 4096)),
        attention_bias=gguf_arch == "qwen2",
        qk_norm=gguf_arch in ("qwen3", "qwen3moe"),
        rope=RopeConfig(theta=float(meta.get(p + "rope.freq_base", 10000.0))),
        num_experts=num_experts,
        num_experts_per_tok=int(meta.get(p + "expert_used_count", 0)),
        moe_intermediate_size=int(meta.get(p + "expert_feed_forward_length", 0)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )
