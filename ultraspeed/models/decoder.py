"""One decoder for every supported family (the switches live in ModelConfig).

    tokens -> embed -> [ RMSNorm -> attention (+KV cache) -> + -> RMSNorm -> MLP or MoE -> + ] x L -> RMSNorm

`Decoder.forward` appends T new tokens for each of B sequences (cache rows 0..B-1) and returns the final hidden
states; `Decoder.logits` applies the LM head separately so callers pay for it only where they need logits.
Per-step facts shared by all layers (positions, rope rows, masks) are computed once in `StepContext`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ultraspeed.config import ModelConfig, RopeConfig
from ultraspeed.engine.kv_cache import KVCache
from ultraspeed.models.layers import Linear, RMSNorm, attend
from ultraspeed.models.moe import DenseMLP, SparseMoE
from ultraspeed.models.rope import apply_rope, rope_table


@dataclass
class StepContext:
    """What every layer needs to know about this forward, computed once."""

    first_row: int                      # cache rows first_row .. first_row+batch-1 take part
    batch: int
    starts: torch.Tensor                # [B] cache length of each row before this step
    positions: torch.Tensor             # [B, T] absolute positions of the new tokens
    span: int                           # keys to attend over: max(starts) + T
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]   # layer type -> cos, sin [B, 1, T, rotary_dim]
    masks: dict[str, torch.Tensor | None]                 # layer type -> bool [B, 1, T, span], None = all
    key_start: dict[str, int]                             # layer type -> first key index worth reading
    # Static shapes (ultraspeed/runtime/static_step.py): starts/positions live on the device, span is the cache
    # length and KV writes always scatter, so nothing is read back to the host (CUDA-graph capturable).
    static: bool = False
    first_start: int = 0                # starts[0] as an int (read once per forward, not once per layer)

    @property
    def single_row(self) -> bool:
        return self.batch == 1 and not self.static


def causal_mask(starts: torch.Tensor, num_new: int, span: int, window: int | None) -> torch.Tensor:
    """mask[b, 0, i, j]: may new token i of row b (at position starts[b]+i) see the key at position j?"""
    query_pos = starts.view(-1, 1, 1) + torch.arange(num_new).view(1, -1, 1)
    key_pos = torch.arange(span).view(1, 1, -1)
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed.unsqueeze(1)


class Attention(nn.Module):
    """Grouped-query attention with optional q/k/v bias, per-head QK-norm, partial rope, sinks, sliding window.

    The layer type picks the rope, the mask and, for MiMo, the number of KV heads and whether there are sinks.
    """

    def __init__(self, config: ModelConfig, layer_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.layer_type = layer_type
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.kv_heads(layer_type), c.head_dim
        self.v_head_dim = c.v_head_dim or c.head_dim
        self.q_size = c.num_heads * c.head_dim
        self.k_size = self.num_kv_heads * c.head_dim
        self.v_size = self.num_kv_heads * self.v_head_dim
        self.scale = c.head_dim ** -0.5
        self.value_scale = c.attention_value_scale
        self.qkv_proj = Linear(c.hidden_size, self.q_size + self.k_size + self.v_size, bias=c.attention_bias,
                               dtype=dtype)
        self.o_proj = Linear(c.num_heads * self.v_head_dim, c.hidden_size, bias=c.o_bias, dtype=dtype)
        self.q_norm = RMSNorm(c.head_dim, c.rms_eps, dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_eps, dtype) if c.qk_norm else None
        self.sinks = (nn.Parameter(torch.zeros(c.num_heads, dtype=dtype)) if layer_type in c.sink_layer_types
                      else None)

    def kv_shape(self) -> tuple[int, int, int]:
        return self.num_kv_heads, self.head_dim, self.v_head_dim

    def forward(self, x: torch.Tensor, step: StepContext, cache: KVCache, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        qk, v = self.qkv_proj(x).split([self.q_size + self.k_size, self.v_size], dim=-1)
        qk = qk.view(B, T, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.v_head_dim).transpose(1, 2)
        cos, sin = step.rope[self.layer_type]
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=2)
            q, k = self.q_norm(q), self.k_norm(k)
            qk = torch.cat([q, k], dim=2)
        # Queries and keys rotate as one tensor: a decode step pays each small op of rope once per layer, not twice.
        q, k = apply_rope(qk.transpose(1, 2), cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        if self.value_scale != 1.0:
            v = v * self.value_scale
        keys, values = write_kv(cache, layer, k, v, step)
        first = step.key_start[self.layer_type]
        mask = step.masks[self.layer_type]
        if first:
            keys, values = keys[:, :, first:], values[:, :, first:]
        out = attend(q, keys, values, mask, self.scale, self.sinks)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def write_kv(cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor,
             step: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the new keys/values at each row's positions; return views of all keys/values up to the span."""
    rows = slice(step.first_row, step.first_row + step.batch)
    key_cache, value_cache = cache.keys[layer][rows], cache.values[layer][rows]
    B, T = step.batch, k.shape[2]
    if step.single_row:
        s = step.first_start
        key_cache[0, :, s:s + T] = k[0]
        value_cache[0, :, s:s + T] = v[0]
    else:
        index = step.positions.view(B, 1, T, 1)
        key_cache.scatter_(2, index.expand(-1, k.shape[1], -1, k.shape[3]), k)
        value_cache.scatter_(2, index.expand(-1, v.shape[1], -1, v.shape[3]), v)
    return key_cache[:, :, :step.span], value_cache[:, :, :step.span]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps, dtype)
        self.self_attn = make_attention(config, config.layer_types[index], dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps, dtype)
        sparse = config.mlp_layer_types[index] == "sparse"
        self.mlp = SparseMoE(config, dtype) if sparse else DenseMLP(config.hidden_size, config.intermediate_size,
                                                                      dtype)

    def forward(self, x: torch.Tensor, step: StepContext, cache: KVCache, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def make_attention(config: ModelConfig, layer_type: str, dtype: torch.dtype) -> nn.Module:
    if config.is_mla:
        from ultraspeed.models.mla import MultiHeadLatentAttention
        return MultiHeadLatentAttention(config, layer_type, dtype)
    return Attention(config, layer_type, dtype)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, _weight=torch.empty(
            config.vocab_size, config.hidden_size, dtype=dtype))
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps, dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        with torch.device("cpu"):   # real tables even when the module is built on the meta device for loading
            self.rope_tables = self._build_rope_tables()

    # -- per-step context -------------------------------------------------------------------------------------

    def _rope_for(self, layer_type: str) -> RopeConfig:
        c = self.config
        return c.sliding_rope if (layer_type == "sliding_attention" and c.sliding_rope) else c.rope

    def _build_rope_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        rotary_head = c.qk_rope_head_dim if c.is_mla else c.head_dim
        tables = {}
        for layer_type in set(c.layer_types):
            rope = self._rope_for(layer_type)
            rotary_dim = int(rotary_head * rope.partial_rotary_factor)
            tables[layer_type] = rope_table(rope, rotary_dim, c.max_position)
        return tables

    def step_context(self, cache: KVCache, batch: int, num_new: int, first_row: int = 0) -> StepContext:
        starts = cache.lengths[first_row:first_row + batch].clone()
        span = int(starts.max()) + num_new
        if span > cache.max_len or span > self.config.max_position:
            raise ValueError(f"sequence of {span} tokens exceeds the cache ({cache.max_len}) "
                             f"or the model context ({self.config.max_position})")
        positions = starts.view(-1, 1) + torch.arange(num_new).view(1, -1)
        device = self.embed_tokens.weight.device
        rope, masks, key_start = {}, {}, {}
        for layer_type, (cos, sin) in self.rope_tables.items():
            rope[layer_type] = (cos[positions].unsqueeze(1).to(device, self.dtype),
                                sin[positions].unsqueeze(1).to(device, self.dtype))
            window = self.config.sliding_window if layer_type == "sliding_attention" else None
            if batch == 1 and num_new == 1:
                # One query sees every stored key (or the last `window`): slice instead of masking.
                masks[layer_type] = None
                key_start[layer_type] = max(0, span - window) if window else 0
            else:
                masks[layer_type] = causal_mask(starts, num_new, span, window).to(device)
                key_start[layer_type] = 0
        return StepContext(first_row, batch, starts, positions.to(device), span, rope, masks, key_start,
                           first_start=int(starts[0]))

    # -- forward ----------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, cache: KVCache, capture_layers: tuple[int, ...] = (),
                first_row: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Append input_ids [B, T] to cache rows first_row..first_row+B-1. Returns normed hidden states [B, T, H] and the outputs of
        the layers listed in `capture_layers` (DFlash conditions its drafter on them)."""
        batch, num_new = input_ids.shape
        step = self.step_context(cache, batch, num_new, first_row)
        x = self.embed_tokens(input_ids)
        captured = []
        for i, layer in enumerate(self.layers):
            x = layer(x, step, cache, i)
            if i in capture_layers:
                captured.append(x.clone())     # a copy: fused CPU layers (kernels/cpu_layer.py) update x in place
        cache.lengths[first_row:first_row + batch] += num_new
        return self.norm(x), captured

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def kv_layout(self) -> list[tuple[int, int, int]]:
        """(kv_heads, key_dim, value_dim) per layer, to allocate a KVCache."""
        return [layer.self_attn.kv_shape() for layer in self.layers]

    def new_cache(self, max_batch: int = 1, max_len: int | None = None) -> KVCache:
        max_len = min(max_len or self.config.max_position, self.config.max_position)
        return KVCache.allocate(self.kv_layout(), max_batch, max_len, self.dtype, self.embed_tokens.weight.device)
