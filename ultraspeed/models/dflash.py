"""DFlash drafter: a few transformer layers that fill a whole block of masked tokens in one forward pass.

    target features (K layers, concatenated) --fc--> RMSNorm --> H_ctx        (once per committed token)
    block = [anchor, MASK x (B-1)] embedded with the target's frozen embedding
    every draft layer:  Q from the block;  K/V = [Wk,Wv . H_ctx ; Wk,Wv . block]   ("KV injection")
    final RMSNorm --> the target's frozen LM head --> draft tokens for slots 1..B-1

Attention rules, shared by training and serving through `block_mask`: a block query sees every context
position strictly before its anchor, its own block bidirectionally (or causally if `causal_in_block`), no other
block, and nothing older than `window` positions when a sliding window is set. The mask token is a learned
embedding vector owned by the drafter, so no vocabulary id has to be spare.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ultraspeed.config import ModelConfig, RopeConfig
from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.layers import Linear, RMSNorm, attend
from ultraspeed.models.rope import apply_rope, rope_table


def default_target_layers(num_target_layers: int, num_features: int) -> tuple[int, ...]:
    """Uniform from the 2nd layer to the 3rd-from-last (the DFlash default)."""
    if num_features == 1:
        return (num_target_layers // 2,)
    span = num_target_layers - 4
    return tuple(int(round(1 + i * span / (num_features - 1))) for i in range(num_features))


@dataclass(frozen=True)
class DFlashConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    target_layer_ids: tuple[int, ...]        # outputs of these target layers feed the drafter
    block_size: int = 16                     # B: anchor + B-1 masked slots
    window: int | None = None                # sliding window over context (None = full)
    causal_in_block: bool = False            # False = bidirectional inside the block (DFlash default)
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position: int = 8192
    loss_decay_gamma: float = 7.0            # training: slot k weighted exp(-(k-1)/gamma)
    draft_vocab_size: int = 0                # >0: draft only among the most frequent tokens (0 = full vocab)
    target_arch: str = ""                    # recorded for humans; checked loosely on load
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_target(cls, target: ModelConfig, num_layers: int = 2, num_features: int = 5, block_size: int = 16,
                   **kw) -> "DFlashConfig":
        layers = default_target_layers(target.num_layers, min(num_features, target.num_layers))
        return cls(hidden_size=target.hidden_size, num_layers=num_layers, num_heads=target.num_heads,
                   num_kv_heads=target.num_kv_heads, head_dim=target.head_dim,
                   intermediate_size=target.intermediate_size or target.moe_intermediate_size,
                   vocab_size=target.vocab_size, target_layer_ids=tuple(sorted(set(layers))),
                   block_size=block_size, rms_eps=target.rms_eps, rope_theta=target.rope.theta,
                   max_position=target.max_position, target_arch=target.arch, **kw)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DFlashConfig":
        d = json.loads(text)
        d["target_layer_ids"] = tuple(d["target_layer_ids"])
        return cls(**d)


def block_mask(query_pos: torch.Tensor, query_block: torch.Tensor, anchor_pos: torch.Tensor,
               key_pos: torch.Tensor, key_block: torch.Tensor, window: int | None,
               causal_in_block: bool) -> torch.Tensor:
    """bool [..., Q, K]: may query i see key j?

    query_block/key_block name the block each token belongs to (-1 = committed context); anchor_pos [..., Q] is
    the position of the query's block slot 0. Context is visible strictly before the anchor: the anchor's own
    target features do not exist yet when drafting.
    """
    qp, kp = query_pos.unsqueeze(-1), key_pos.unsqueeze(-2)
    is_context = (key_block == -1).unsqueeze(-2)
    context_ok = is_context & (kp < anchor_pos.unsqueeze(-1))
    same_block = (key_block.unsqueeze(-2) == query_block.unsqueeze(-1)) & ~is_context
    if causal_in_block:
        same_block &= kp <= qp
    allowed = context_ok | same_block
    if window is not None:
        allowed &= (qp - kp) < window
    return allowed


class DraftLayer(nn.Module):
    def __init__(self, c: DFlashConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_eps)
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size)
        self.q_norm = RMSNorm(c.head_dim, c.rms_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_eps)
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size)

    def project_kv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [b, N, H] -> k, v [b, Hkv, N, D] with k_norm and rope at the tokens' positions."""
        b, n, _ = h.shape
        k = self.k_norm(self.k_proj(h).view(b, n, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, q_len, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_norm(self.q_proj(h).view(b, q_len, self.num_heads, self.head_dim)).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k, v = self.project_kv(h, cos, sin)
        keys, values = torch.cat([ctx_k, k], dim=2), torch.cat([ctx_v, v], dim=2)
        out = attend(q, keys, values, mask, self.head_dim ** -0.5)
        x = x + self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DFlashDrafter(nn.Module):
    """Trainable parts only; the target's embedding and LM head are passed in when used."""

    def __init__(self, config: DFlashConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.fc = Linear(len(c.target_layer_ids) * c.hidden_size, c.hidden_size)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.layers = nn.ModuleList(DraftLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_eps)
        # Drafting over a frequency-ranked sub-vocabulary makes the LM head, by far the largest matmul of a
        # small drafter, several times cheaper; verification still uses the full vocabulary, so it stays lossless.
        if c.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.arange(c.draft_vocab_size))
        else:
            self.draft_vocab = None
        cos, sin = rope_table(RopeConfig(theta=c.rope_theta), c.head_dim, c.max_position)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Serving may install a quantized copy of the draft head (quant/int8.match_drafter_weights); training
        # keeps the fp32 rows it backpropagates through.
        self.served_head: nn.Module | None = None
        # ... and its layers fused into one C++ call each for CPU drafting (kernels/cpu_draft_layer.py).
        self.fused_layers = None

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, N] -> cos, sin [b, 1, N, D]"""
        return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)

    def draft_head(self, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """The target LM head's rows for the draft vocabulary. Kept between calls while the head and the
        vocabulary are the same tensors: re-slicing thousands of rows every step cost a CPU decode step more
        than both draft layers together."""
        if self.draft_vocab is None:
            return lm_head_weight
        cached = self.__dict__.get("_draft_head")
        if (cached is None or cached["head"] is not lm_head_weight or cached["vocab"] is not self.draft_vocab
                or cached["version"] != lm_head_weight._version):
            cached = {"head": lm_head_weight, "vocab": self.draft_vocab, "version": lm_head_weight._version,
                      "rows": lm_head_weight[self.draft_vocab].detach()}
            self.__dict__["_draft_head"] = cached
        return cached["rows"]

    def draft_logits(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (full vocabulary if none was chosen)."""
        if self.served_head is not None:
            return self.served_head(hidden)
        return F.linear(hidden.contiguous(), self.draft_head(lm_head_weight))

    def to_token_ids(self, draft_indices: torch.Tensor) -> torch.Tensor:
        return draft_indices if self.draft_vocab is None else self.draft_vocab[draft_indices]

    def context_states(self, features: torch.Tensor) -> torch.Tensor:
        """Concatenated target features [b, N, K*H] -> H_ctx [b, N, H]."""
        return self.hidden_norm(self.fc(features))

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per draft layer, the context keys/values [b, Hkv, N, D] of committed tokens (computed once each)."""
        ctx = self.context_states(features)
        cos, sin = self.rope_at(positions)
        return [layer.project_kv(ctx, cos, sin) for layer in self.layers]

    def block_embeddings(self, anchor_embeds: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        """anchor_embeds [b, n, H] (one per block) -> [b, n*B, H]: each anchor followed by B-1 mask vectors."""
        b, n, h = anchor_embeds.shape
        B = self.config.block_size
        blocks = self.mask_embedding.to(anchor_embeds.dtype).expand(b, n, B, h).clone()
        blocks[:, :, 0] = anchor_embeds
        return blocks.view(b, n * B, h)

    def forward(self, block_embeds: torch.Tensor, positions: torch.Tensor,
                context: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> torch.Tensor:
        """block_embeds [b, Q, H] at positions [b, Q]; context per layer; mask [b, 1, Q, Nctx+Q].
        Returns normed hidden states [b, Q, H] (apply the target LM head for logits)."""
        cos, sin = self.rope_at(positions)
        x = block_embeds
        for layer, (ctx_k, ctx_v) in zip(self.layers, context):
            x = layer(x, cos, sin, ctx_k, ctx_v, mask)
        return self.norm(x)


def with_block_size(drafter: DFlashDrafter, block_size: int) -> DFlashDrafter:
    """The same weights drafting a shorter block (the drafter has no block-size-specific weights). A longer one is
    refused: the drafter never learnt to fill those slots (and a huge one would allocate a huge mask)."""
    if not 2 <= block_size <= drafter.config.block_size:
        raise UltraSpeedError(f"block size {block_size}: this drafter drafts blocks of 2 to "
                              f"{drafter.config.block_size} tokens (its training block)")
    if block_size == drafter.config.block_size:
        return drafter
    clone = object.__new__(type(drafter))
    clone.__dict__ = dict(drafter.__dict__)
    clone.config = dataclasses.replace(drafter.config, block_size=block_size)
    return clone


def init_from_target(drafter: DFlashDrafter, target: nn.Module) -> None:
    """Start draft layer i from the last target layers' weights: same width, so the drafter begins with
    attention and MLP maps that already suit the target's residual stream (a strong, free initialisation)."""
    tl = target.layers[-drafter.config.num_layers:]
    with torch.no_grad():
        for d, t in zip(drafter.layers, tl):
            a = t.self_attn
            if not hasattr(a, "qkv_proj"):
                continue
            q, k, v = a.qkv_proj.weight.split([a.q_size, a.k_size, a.v_size], dim=0)
            d.q_proj.weight.copy_(q), d.k_proj.weight.copy_(k), d.v_proj.weight.copy_(v)
            d.o_proj.weight.copy_(a.o_proj.weight)
            d.input_layernorm.weight.copy_(t.input_layernorm.weight)
            d.post_attention_layernorm.weight.copy_(t.post_attention_layernorm.weight)
            if hasattr(t.mlp, "gate_up_proj") and isinstance(t.mlp.gate_up_proj, nn.Module):
                gate, up = t.mlp.gate_up_proj.weight.chunk(2, dim=0)
                if gate.shape == d.gate_proj.weight.shape:
                    d.gate_proj.weight.copy_(gate), d.up_proj.weight.copy_(up)
                    d.down_proj.weight.copy_(t.mlp.down_proj.weight)
        drafter.norm.weight.copy_(target.norm.weight)


def init_random(drafter: DFlashDrafter, seed: int = 0, std: float = 0.02) -> None:
    """Fresh weights for a new drafter (norms at one, matrices small normal, mask vector small normal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def save_drafter(drafter: DFlashDrafter, path, extra_metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous() for k, v in drafter.state_dict().items()}
    metadata = {"dflash_config": drafter.config.to_json(), **(extra_metadata or {})}
    save_file(state, str(path), metadata=metadata)


def drafter_misfits(config: DFlashConfig, target: ModelConfig) -> list[str]:
    """Why a drafter cannot serve `target` (empty if it can): it reads the target's hidden states and layers and
    drafts in its vocabulary."""
    problems = []
    if config.hidden_size != target.hidden_size:
        problems.append(f"hidden size {config.hidden_size}, the model's is {target.hidden_size}")
    if config.vocab_size != target.vocab_size:
        problems.append(f"vocabulary of {config.vocab_size}, the model's is {target.vocab_size}")
    if max(config.target_layer_ids, default=0) >= target.num_layers:
        problems.append(f"features of layer {max(config.target_layer_ids)}, the model has {target.num_layers}")
    return problems


def load_drafter(path, dtype: torch.dtype = torch.float32, target: ModelConfig | None = None) -> DFlashDrafter:
    """A drafter from its safetensors file; with `target`, checked to fit that model first."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "dflash_config" not in meta:
                raise UltraSpeedError(f"{path}: not a DFlash drafter checkpoint (no dflash_config metadata)")
            config = DFlashConfig.from_json(meta["dflash_config"])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except UltraSpeedError:
        raise
    except Exception as e:
        raise UltraSpeedError(f"{path}: cannot read drafter ({e}); the file is missing, corrupt or truncated") from e
    problems = drafter_misfits(config, target) if target is not None else []
    if problems:
        raise UltraSpeedError(f"{path}: this drafter was trained for another model ({'; '.join(problems)}); "
                              "train one for this model with `ultraspeed train-drafter`, or pass --no-spec")
    with torch.device("meta"):
        drafter = DFlashDrafter(config)
    try:
        drafter.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UltraSpeedError(f"{path}: its tensors do not match its own dflash_config ({e})") from e
    if drafter.draft_vocab is not None and not 0 <= int(drafter.draft_vocab.min()) <= int(
            drafter.draft_vocab.max()) < config.vocab_size:
        raise UltraSpeedError(f"{path}: its draft vocabulary holds ids outside [0, {config.vocab_size})")
    cos, sin = rope_table(RopeConfig(theta=config.rope_theta), config.head_dim, config.max_position)
    drafter.rope_cos, drafter.rope_sin = cos, sin
    return drafter.to(dtype).eval().requires_grad_(False)
