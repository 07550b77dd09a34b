"""Multi-head latent attention (DeepSeek-V2/V3), run in latent space.

Keys and values are not projected per head from the hidden state. One latent c (kv_lora_rank wide, RMS-normed)
and one roped key k_r shared by all heads are; a head's key is [W_uk,h c, k_r] and its value W_uv,h c, with
W_uk/W_uv the two halves of kv_b_proj. Both expansions are linear, so they move to the query and the output:

    q_h · [W_uk,h c, k_r] = [W_uk,hᵀ q_nope,h, q_rope,h] · [c, k_r]          out_h = W_uv,h (Σ_j p_hj c_j)

and attention runs as multi-query attention over the latents. The KV cache stores just [c, k_r] per token, one
head of kv_lora_rank + qk_rope_head_dim (576 wide for V3) instead of num_heads × (qk_head_dim + v_head_dim)
(40,960): the values are the latents themselves, i.e. the first kv_lora_rank dims of the cached keys, so the
value cache is left empty. Scores cost kv_lora_rank + rope per key instead of qk_head_dim, a fair trade for decode,
which would otherwise re-expand every cached latent at every step.
"""

from __future__ import annotations

import torch
from torch import nn

from ultraspeed.config import ModelConfig
from ultraspeed.engine.kv_cache import KVCache
from ultraspeed.models.decoder import StepContext, write_kv
from ultraspeed.models.layers import Linear, RMSNorm, attend
from ultraspeed.models.rope import apply_rope, deinterleave, softmax_mscale

# DeepSeek builds its two low-rank norms with the RMSNorm default eps, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    """Parameters keep the checkpoint's names and shapes; kv_b_proj is read as a matrix to absorb it."""

    def __init__(self, config: ModelConfig, layer_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.layer_type = layer_type
        self.num_heads = c.num_heads
        self.nope_dim, self.rope_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_head_dim = c.v_head_dim or c.qk_nope_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.interleaved = c.rope.interleaved
        q_size = c.num_heads * (self.nope_dim + self.rope_dim)
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, q_size, dtype=dtype)
        else:   # V3 sends queries through a low-rank bottleneck too
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = Linear(c.q_lora_rank, q_size, dtype=dtype)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + self.rope_dim, bias=c.attention_bias,
                                         dtype=dtype)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.kv_b_proj = Linear(c.kv_lora_rank, c.num_heads * (self.nope_dim + self.v_head_dim), dtype=dtype)
        self.o_proj = Linear(c.num_heads * self.v_head_dim, c.hidden_size, bias=c.o_bias, dtype=dtype)
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5 * softmax_mscale(c.rope)

    def kv_shape(self) -> tuple[int, int, int]:
        return 1, self.kv_lora_rank + self.rope_dim, 0

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_proj is not None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def rope(self, x: torch.Tensor, step: StepContext) -> torch.Tensor:
        # Interleaved checkpoints rotate pairs (x0, x1), (x2, x3), ...; regrouping evens then odds turns that into
        # rotate-half rope. Queries and keys are regrouped alike, so their dot products are unchanged.
        if self.interleaved:
            x = deinterleave(x)
        cos, sin = step.rope[self.layer_type]
        return apply_rope(x, cos, sin)

    def forward(self, x: torch.Tensor, step: StepContext, cache: KVCache, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, r = self.num_heads, self.kv_lora_rank
        q = self.queries(x).view(B, T, H, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).unsqueeze(1).split([r, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)                               # [B, 1, T, r]
        q_rope, k_rope = self.rope(q_rope, step), self.rope(k_rope, step)

        w_uk, w_uv = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_head_dim, r).split(
            [self.nope_dim, self.v_head_dim], dim=1)                       # [H, nope, r], [H, v, r]
        q_latent = torch.cat([q_nope @ w_uk, q_rope], dim=-1)               # [B, H, T, r + rope]

        keys, _ = write_kv(cache, layer, torch.cat([latent, k_rope], dim=-1), latent[..., :0], step)
        keys = keys[:, :, step.key_start[self.layer_type]:]
        out = attend(q_latent, keys, keys[..., :r], step.masks[self.layer_type], self.scale)   # [B, H, T, r]
        out = out @ w_uv.transpose(1, 2)                                    # [B, H, T, v]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
