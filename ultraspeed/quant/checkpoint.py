"""Writing a model with packed MXFP4 experts as a checkpoint directory that `load_model` reads back.

Layout (a Hugging Face-style directory):
- model.safetensors: the Decoder's own state_dict, names prefixed with "model." (lm_head.weight as is, left out
  when tied to the embedding). Packed modules contribute their buffers `<param>_blocks` uint8
  [..., N, K//32, 16] and `<param>_scales` uint8 [..., N, K//32] in gpt-oss layout, e.g.
  `model.layers.3.mlp.experts.gate_up_proj_blocks` or `model.layers.3.mlp.gate_up_proj.weight_scales`; every
  other tensor is stored unquantized in the model's dtype. Names are the Decoder's (fused qkv_proj and
  gate_up_proj, gate rows first), which the loader reads as they are.
- config.json: HF-style. The source's own config.json when it was a Hugging Face directory; otherwise (GGUF)
  written from the ModelConfig and checked to read back to the very same ModelConfig. Either way it gains
  `quantization_config: {"quant_method": "mxfp4", ...}`.
- tokenizer.json (the tokenizers backend) and tokenizer_config.json (chat_template, bos/eos, add_bos_token).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from safetensors.torch import save_file

from ultraspeed.config import ModelConfig, config_from_hf
from ultraspeed.errors import UltraSpeedError
from ultraspeed.loader import LoadedModel
from ultraspeed.quant.mxfp4 import BLOCK_SIZE

WEIGHTS_FILE = "model.safetensors"
_MOE_ONLY_FIELDS = ("moe_intermediate_size", "norm_topk_prob")


def quantization_config(scale_rule: str, **extra) -> dict:
    return {"quant_method": "mxfp4", "format": "gpt-oss blocks/scales", "block_size": BLOCK_SIZE,
            "scale_rule": scale_rule, "quantized": "routed experts (dense model: MLP projections)",
            "producer": "ultraspeed", **extra}


def hf_config_dict(config: ModelConfig) -> dict:
    """A config.json dict that `config_from_hf` reads back to exactly `config`; UltraSpeedError if the fields
    written here cannot express it (an architecture only ever read from its own HF config)."""
    c, r = config, config.rope
    d = {
        "model_type": c.arch, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_eps, "max_position_embeddings": c.max_position,
        "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
        "rope_theta": r.theta,
        "rope_parameters": {"rope_type": r.rope_type, "rope_theta": r.theta, "factor": r.factor,
                            "partial_rotary_factor": r.partial_rotary_factor, "low_freq_factor": r.low_freq_factor,
                            "high_freq_factor": r.high_freq_factor,
                            "original_max_position_embeddings": r.original_max_position,
                            "beta_fast": r.beta_fast, "beta_slow": r.beta_slow, "mscale": r.mscale,
                            "mscale_all_dim": r.mscale_all_dim},
        "layer_types": list(c.layer_types), "mlp_layer_types": list(c.mlp_layer_types),
        "bos_token_id": c.bos_token_id, "eos_token_id": list(c.eos_token_ids),
    }
    if c.sliding_window is not None:
        d["sliding_window"] = c.sliding_window
    if c.num_experts:
        d.update(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                 moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob)
    back = config_from_hf(json.loads(json.dumps(d)))
    # A dense model never reads the MoE fields, and config_from_hf fills them with its own defaults.
    ignored = () if c.num_experts else _MOE_ONLY_FIELDS
    differ = [f.name for f in fields(ModelConfig)
              if f.name not in ignored and getattr(back, f.name) != getattr(c, f.name)]
    if differ:
        raise UltraSpeedError(f"cannot write a config.json for this {c.arch} model: fields {', '.join(differ)} "
                              "would not read back; quantize it from its Hugging Face directory instead")
    return d


def _source_hf_config(loaded: LoadedModel) -> dict | None:
    path = Path(loaded.source) / "config.json"
    return json.loads(path.read_text()) if Path(loaded.source).is_dir() and path.exists() else None


def check_checkpoint_output(out: str | Path, source: str | Path | None = None) -> Path:
    """Refuse an output directory where writing a checkpoint would destroy or mix with another model: the source
    itself, a directory holding a checkpoint UltraSpeed did not write (rewriting our own, e.g. a resumed QAT
    export, is fine), or one with other weight files (the loader would read them all)."""
    out = Path(out)
    if source is not None and out.resolve() == Path(source).resolve():
        raise UltraSpeedError(f"{out} is the input model: writing there would overwrite it; choose a new directory")
    if out.exists() and not out.is_dir():
        raise UltraSpeedError(f"{out} exists and is not a directory")
    config = out / "config.json"
    if config.exists():
        producer = None
        try:
            producer = json.loads(config.read_text()).get("quantization_config", {}).get("producer")
        except (OSError, ValueError, AttributeError):
            pass
        if producer != "ultraspeed":
            raise UltraSpeedError(f"{out} already holds another model's checkpoint (config.json); choose a new or "
                                  "empty directory")
    stale = [p.name for p in out.glob("*.safetensors*") if p.name not in (WEIGHTS_FILE, f"{WEIGHTS_FILE}.partial")]
    if stale:
        raise UltraSpeedError(f"{out} already holds other weight files ({', '.join(sorted(stale))}); "
                              "choose an empty output directory")
    return out


def save_mxfp4_checkpoint(loaded: LoadedModel, out: str | Path, quant: dict) -> Path:
    """Write `loaded` (its expert targets already swapped for packed modules) to the directory `out` (see
    check_checkpoint_output). Every file is written under a temporary name first and renamed at the end, so an
    interrupted or failed run leaves no mix of new and old files that looks final."""
    out = check_checkpoint_output(out, loaded.source)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = loaded.model, loaded.tokenizer
    # Stop tokens the source knew through its tokenizer (GGUF end-of-turn) become config eos ids, so the written
    # checkpoint stops where the source did.
    config = loaded.config.replace(eos_token_ids=tuple(sorted({*loaded.config.eos_token_ids,
                                                               *tok.stop_token_ids})))
    hf_config = _source_hf_config(loaded) or hf_config_dict(config)
    hf_config["quantization_config"] = quant

    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the loader re-ties it; safetensors refuses shared storage anyway
        state[name if name.startswith("lm_head.") else f"model.{name}"] = tensor.detach().contiguous().cpu()
    if not any(name.endswith("_blocks") for name in state):
        raise ValueError("save_mxfp4_checkpoint: the model holds no packed MXFP4 weights (run quantize_experts)")
    tokenizer_config = {"chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                        "add_bos_token": tok.add_bos}
    writers = {WEIGHTS_FILE: lambda p: save_file(state, str(p), metadata={"format": "pt", "quantization": "mxfp4"}),
               "config.json": lambda p: p.write_text(json.dumps(hf_config, indent=2)),
               "tokenizer.json": lambda p: tok.backend.save(str(p)),
               "tokenizer_config.json": lambda p: p.write_text(json.dumps(tokenizer_config, indent=2))}
    for name, write in writers.items():
        write(out / f"{name}.partial")
    for name in writers:
        (out / f"{name}.partial").replace(out / name)
    return out
