"""Static-shape decode steps: one plain decode step of b rows, and one greedy speculative step (drafter forward,
target verify of the block, acceptance), with nothing read back to the host inside the step and no shape that
depends on data, so that each step can be captured as one CUDA graph (runtime/graphs.py) and replayed.

What differs from the dynamic path (`Decoder.forward`, engine/speculative.py), and why:
- Inputs and outputs are preallocated device buffers that the step updates in place (`lengths`, `tokens` /
  `anchors`), so consecutive replays chain without the host; the host reads one small result tensor per step.
- Positions, rope rows and masks are computed on the device from `lengths`; attention runs over the whole static
  cache length S with a device-built mask (torch backend), or over each row's valid keys through a kernel that
  reads the length on the device (triton backend). KV writes always scatter at device positions.
- Routed experts run without grouping on the host (runtime/backend.py).
- Speculative decoding: the drafter writes its block's K/V into its cache at the block's positions (scratch
  beyond the committed length, masked out later) instead of concatenating them to the context, and after the
  verify the drafter's context K/V of all B verified positions are written at once; only the first
  accepted + 1 become committed (lengths += accepted + 1), the rest are stale entries past the length that the
  next block overwrites. This is the dynamic path's crop / append_context with static shapes.

Numbers: with the torch backend, the same ops in the same order as the dynamic path (attention over a longer,
masked key range and expert sums over zero-weighted experts aside), so logits agree to float rounding and
greedy tokens are identical (tests/runtime).

Sampling (`sampling=True`): per-row temperature / top-k / top-p and seeds in device buffers, uniforms hashed from
(seed, position) instead of drawn from a generator (runtime/device_sampling.py); the speculative step applies the
rejection rule (engine/speculative.rejection_sample). Greedy rows of such a step get one-hot distributions, under
which the same rule is exactly greedy. Lookup drafts (engine/lookup_draft.py) enter the speculative step through
`lookup_tokens` / `lookup_counts`: the host writes each row's n-gram draft there before the replay, and it takes
the place of the drafter's first slots. Where every row has one, `without_drafter()` gives the same step (same
buffers) minus the drafter's forward, captured as a graph of its own, as the dynamic path skips the drafter then.
"""

from __future__ import annotations

import copy

import torch

from ultraspeed.engine.kv_cache import KVCache
from ultraspeed.engine.sampler import inverse_cdf
from ultraspeed.engine.speculative import accept_greedy, rejection_sample
from ultraspeed.models.decoder import Attention, Decoder, StepContext
from ultraspeed.models.dflash import DFlashDrafter
from ultraspeed.models.moe import DenseMLP, SparseMoE
from ultraspeed.runtime.backend import TorchBackend, choose_backend
from ultraspeed.runtime.device_sampling import ACCEPT, DRAW, SamplingBuffers


def causal_mask_static(positions: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """bool [b, 1, T, S] on positions' device: query at positions[b, i] sees keys 0..position (the last
    `window` of them if set). Keys past the query are the block's later tokens or stale entries: hidden."""
    query_pos = positions.unsqueeze(-1)
    key_pos = torch.arange(num_keys, device=positions.device)
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed.unsqueeze(1)


def draft_mask_static(starts: torch.Tensor, block_size: int, num_keys: int, window: int | None,
                      causal_in_block: bool) -> torch.Tensor:
    """DFlash's `block_mask` over a static cache whose positions [start, start+B) hold the block: a block query
    sees the context before its anchor and its own block (causally if asked), within `window` if set."""
    query_pos = starts.view(-1, 1, 1) + torch.arange(block_size, device=starts.device).view(1, -1, 1)
    key_pos = torch.arange(num_keys, device=starts.device)
    allowed = (key_pos < starts.view(-1, 1, 1) + block_size).expand(-1, block_size, -1)
    if causal_in_block:
        allowed = allowed & (key_pos <= query_pos)
    if window is not None:
        allowed = allowed & ((query_pos - key_pos) < window)
    return allowed.unsqueeze(1)


def scatter_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> None:
    """Write k/v [b, H, T, D] at positions [b, T] of key_cache/value_cache [b, H, S, D] (device indices)."""
    b, t = positions.shape
    index = positions.view(b, 1, t, 1)
    key_cache.scatter_(2, index.expand(-1, k.shape[1], -1, k.shape[3]), k)
    value_cache.scatter_(2, index.expand(-1, v.shape[1], -1, v.shape[3]), v)


class StaticDecoder:
    """`Decoder.forward` over cache rows 0..b-1 with static shapes: b and T come from the inputs' shapes, the
    positions from `lengths` [b] on the device. Does not touch `cache.lengths` (the caller owns the lengths)."""

    def __init__(self, model: Decoder, cache: KVCache, backend: TorchBackend | None = None) -> None:
        self.model, self.cache = model, cache
        self.device = model.embed_tokens.weight.device
        self.backend = backend or choose_backend(self.device)
        self.num_keys = min(cache.max_len, model.config.max_position)
        # Rope tables on the device, fp32 like the CPU tables the dynamic path gathers from.
        self.rope_tables = {t: (cos.to(self.device), sin.to(self.device)) for t, (cos, sin) in
                            model.rope_tables.items()}
        c = model.config
        self.windows = {t: (c.sliding_window if t == "sliding_attention" else None) for t in set(c.layer_types)}
        # Layer types whose attention reads a mask under this backend (the others skip building one).
        self.masked_types = set()
        for layer in model.layers:
            attn = layer.self_attn
            plain = isinstance(attn, Attention)
            if self.backend.needs_mask(self.windows[attn.layer_type], getattr(attn, "sinks", None), plain):
                self.masked_types.add(attn.layer_type)

    def context(self, lengths: torch.Tensor, num_new: int) -> StepContext:
        b = lengths.shape[0]
        positions = lengths.view(b, 1) + torch.arange(num_new, device=lengths.device).view(1, num_new)
        dtype = self.model.dtype
        rope = {t: (cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype))
                for t, (cos, sin) in self.rope_tables.items()}
        masks = {t: (causal_mask_static(positions, self.num_keys, self.windows[t]) if t in self.masked_types
                     else None) for t in self.rope_tables}
        return StepContext(0, b, lengths, positions, self.num_keys, rope, masks, {t: 0 for t in self.rope_tables},
                           static=True)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor,
                capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids [b, T] at positions lengths[r]..lengths[r]+T-1 -> (normed hidden [b, T, H], captured layer
        outputs). The residual add of each sub-layer is fused with the norm that follows it."""
        be, m = self.backend, self.model
        step = self.context(lengths, input_ids.shape[1])
        ends = lengths + input_ids.shape[1]
        residual = m.embed_tokens(input_ids)
        first = m.layers[0].input_layernorm
        h = be.rms_norm(residual, first.weight, first.eps)
        captured = []
        for i, layer in enumerate(m.layers):
            a = self.attention(layer.self_attn, h, step, ends, i)
            post = layer.post_attention_layernorm
            h, residual = be.add_rms_norm(a, residual, post.weight, post.eps)
            out = self.mlp(layer.mlp, h)
            norm = m.layers[i + 1].input_layernorm if i + 1 < len(m.layers) else m.norm
            h, residual = be.add_rms_norm(out, residual, norm.weight, norm.eps)
            if i in capture_layers:
                captured.append(residual)
        return h, captured

    def attention(self, attn: torch.nn.Module, x: torch.Tensor, step: StepContext, ends: torch.Tensor,
                  layer: int) -> torch.Tensor:
        if not isinstance(attn, Attention):
            return attn(x, step, self.cache, layer)    # MLA and others: their own forward, static via `step`
        be = self.backend
        b, t, _ = x.shape
        q, k, v = be.linear(attn.qkv_proj, x).split([attn.q_size, attn.k_size, attn.v_size], dim=-1)
        q = q.view(b, t, attn.num_heads, attn.head_dim)
        k = k.view(b, t, attn.num_kv_heads, attn.head_dim)
        v = v.view(b, t, attn.num_kv_heads, attn.v_head_dim)
        if attn.q_norm is not None:
            q = be.rms_norm(q, attn.q_norm.weight, attn.q_norm.eps)
            k = be.rms_norm(k, attn.k_norm.weight, attn.k_norm.eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = step.rope[attn.layer_type]
        q, k = be.rope(q, cos, sin), be.rope(k, cos, sin)
        if attn.value_scale != 1.0:
            v = v * attn.value_scale
        keys, values = self.cache.keys[layer][:b], self.cache.values[layer][:b]
        scatter_kv(keys, values, k, v, step.positions)
        out = be.attention(q, keys[:, :, :self.num_keys], values[:, :, :self.num_keys], step.masks[attn.layer_type],
                           ends, attn.scale, attn.sinks, causal_block=True)
        return be.linear(attn.o_proj, out.transpose(1, 2).reshape(b, t, -1))

    def mlp(self, mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(mlp, SparseMoE):
            flat = x.reshape(-1, x.shape[-1])
            weights, ids = mlp.route(flat)
            out = self.backend.experts(mlp.experts, flat, weights, ids)
            if mlp.shared_experts is not None:
                out = out + self.dense_mlp(mlp.shared_experts, flat)
            return out.view(x.shape)
        if isinstance(mlp, DenseMLP):
            return self.dense_mlp(mlp, x)
        return mlp(x)

    def dense_mlp(self, mlp: DenseMLP, x: torch.Tensor) -> torch.Tensor:
        be = self.backend
        gate, up = be.linear(mlp.gate_up_proj, x).chunk(2, dim=-1)
        return be.linear(mlp.down_proj, be.silu_and_mul(gate, up))


class DecodeStep:
    """One decode step of rows 0..b-1: tokens [b, 1] at lengths [b] -> next tokens, in place.

    Buffers (device, fixed addresses): `tokens`, `lengths` (inputs, advanced by the step), `logits` [b, V] and
    `next_tokens` [b] (outputs). Greedy, or with `sampling` each row as its `sampling` buffers say.
    """

    def __init__(self, model: Decoder, cache: KVCache, batch: int, backend: TorchBackend | None = None,
                 sampling: bool = False) -> None:
        if batch > cache.max_batch:
            raise ValueError(f"batch {batch} exceeds the cache's {cache.max_batch} rows")
        self.model, self.batch = model, batch
        self.forward_ = StaticDecoder(model, cache, backend)
        device = self.forward_.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.sampling = SamplingBuffers(batch, device) if sampling else None
        self.num_new = 1

    def state(self) -> list[torch.Tensor]:
        """Buffers the step mutates (graphs.py restores them after warm-up runs)."""
        return [self.tokens, self.lengths]

    @torch.no_grad()
    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, _ = self.forward_.forward(self.tokens, self.lengths)
        logits = self.model.logits(hidden[:, -1])
        if self.sampling is None:
            next_tokens = logits.argmax(-1)
        else:
            u = self.sampling.uniform(self.lengths.view(-1, 1), DRAW)
            next_tokens = inverse_cdf(self.sampling.distribution(logits), u.view(-1))
        self.lengths.add_(1)
        self.tokens.copy_(next_tokens.view(-1, 1))
        return next_tokens, logits


class SpeculativeStep:
    """One DFlash step of rows 0..b-1: draft B-1 tokens after each anchor (a row's lookup draft, where the host
    wrote one, in its first slots), verify the block with the target, accept the longest agreeing prefix plus the
    target's bonus token (greedy), or by the rejection rule (`sampling`), advance.

    Buffers: `anchors` [b] and `lengths` [b] (inputs; lengths[r] is the committed length of row r in both the
    target and the drafter cache, i.e. the anchor's position), advanced in place. `step()` returns `result`
    [b, B+1] int64: column 0 the accepted draft count a, columns 1..a+1 the committed tokens (a drafts, then the
    bonus token, which is the next anchor), -1 after. That tensor is the only thing the host needs to read.
    """

    def __init__(self, target: Decoder, drafter: DFlashDrafter, cache: KVCache, draft_cache: KVCache, batch: int,
                 backend: TorchBackend | None = None, sampling: bool = False) -> None:
        if batch > min(cache.max_batch, draft_cache.max_batch):
            raise ValueError(f"batch {batch} exceeds the caches' rows")
        self.target, self.drafter, self.batch = target, drafter, batch
        self.draft_cache = draft_cache
        self.target_forward = StaticDecoder(target, cache, backend)
        self.backend = self.target_forward.backend
        device = self.target_forward.device
        self.block_size = drafter.config.block_size
        self.num_new = self.block_size
        self.draft_keys = min(draft_cache.max_len, drafter.config.max_position)
        self.anchors = torch.zeros(batch, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.lookup_tokens = torch.zeros(batch, self.block_size - 1, dtype=torch.long, device=device)
        self.lookup_counts = torch.zeros(batch, dtype=torch.long, device=device)
        self.sampling = SamplingBuffers(batch, device) if sampling else None
        c = drafter.config
        self.draft_needs_mask = self.backend.needs_mask(c.window, None, True)
        self.runs_drafter = True

    def state(self) -> list[torch.Tensor]:
        return [self.anchors, self.lengths]

    def without_drafter(self) -> SpeculativeStep:
        """This step, sharing every buffer and cache, but drafting only each row's lookup draft (zeros past its
        count: any proposal fixed before the target runs keeps the output exact). For steps where every row
        looked up; the target's verify still writes the drafter's context, so later drafter steps see it."""
        twin = copy.copy(self)
        twin.runs_drafter = False
        return twin

    def block_positions(self) -> torch.Tensor:
        return self.lengths.view(-1, 1) + torch.arange(self.block_size, device=self.lengths.device).view(1, -1)

    @torch.no_grad()
    def draft(self) -> torch.Tensor:
        """Draft tokens [b, B-1]: the drafter's forward (engine/speculative.draft_block) on a static cache."""
        d, be, c = self.drafter, self.backend, self.drafter.config
        b, B = self.batch, self.block_size
        positions = self.block_positions()
        ends = self.lengths + B
        mask = (draft_mask_static(self.lengths, B, self.draft_keys, c.window, c.causal_in_block)
                if self.draft_needs_mask else None)
        x = d.block_embeddings(self.target.embed_tokens(self.anchors).view(b, 1, -1))
        cos, sin = d.rope_at(positions)
        for i, layer in enumerate(d.layers):
            norm = layer.input_layernorm
            h = be.rms_norm(x, norm.weight, norm.eps)
            q = be.linear(layer.q_proj, h).view(b, B, layer.num_heads, layer.head_dim)
            q = be.rope(be.rms_norm(q, layer.q_norm.weight, layer.q_norm.eps).transpose(1, 2), cos, sin)
            k = be.linear(layer.k_proj, h).view(b, B, layer.num_kv_heads, layer.head_dim)
            k = be.rope(be.rms_norm(k, layer.k_norm.weight, layer.k_norm.eps).transpose(1, 2), cos, sin)
            v = be.linear(layer.v_proj, h).view(b, B, layer.num_kv_heads, layer.head_dim).transpose(1, 2)
            keys, values = self.draft_cache.keys[i][:b], self.draft_cache.values[i][:b]
            scatter_kv(keys, values, k, v, positions)       # the block's own keys, as scratch past the context
            out = be.attention(q, keys[:, :, :self.draft_keys], values[:, :, :self.draft_keys], mask, ends,
                               layer.head_dim ** -0.5, None, causal_block=c.causal_in_block)
            o = be.linear(layer.o_proj, out.transpose(1, 2).reshape(b, B, -1))
            post = layer.post_attention_layernorm
            h, x = be.add_rms_norm(o, x, post.weight, post.eps)
            act = be.silu_and_mul(be.linear(layer.gate_proj, h), be.linear(layer.up_proj, h))
            x = x + be.linear(layer.down_proj, act)
        hidden = be.rms_norm(x, d.norm.weight, d.norm.eps)
        return d.to_token_ids(d.draft_logits(hidden[:, 1:], self.target.lm_head.weight).argmax(-1))

    @torch.no_grad()
    def verify(self, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target forward on [anchor, drafts], acceptance, drafter context, advance. -> (result, logits)."""
        d = self.drafter
        b, B = self.batch, self.block_size
        ids = torch.cat([self.anchors.view(b, 1), drafts], dim=1)
        hidden, captured = self.target_forward.forward(ids, self.lengths, d.config.target_layer_ids)
        logits = self.target.logits(hidden)
        positions = self.block_positions()
        if self.sampling is None:
            accepted, bonus = accept_greedy(drafts, logits)
        else:
            accepted, bonus = rejection_sample(drafts, self.sampling.distribution(logits),
                                               self.sampling.uniform(positions[:, :-1], ACCEPT),
                                               self.sampling.uniform(positions, DRAW))
        # The drafter's context K/V of every verified position; those past the accepted prefix stay stale.
        for i, (k, v) in enumerate(d.context_kv(torch.cat(captured, dim=-1), positions)):
            scatter_kv(self.draft_cache.keys[i][:b], self.draft_cache.values[i][:b], k, v, positions)
        slot = torch.arange(B, device=drafts.device).view(1, B)
        a = accepted.view(b, 1)
        padded_drafts = torch.cat([drafts, drafts[:, :1]], dim=1)
        tokens = torch.where(slot < a, padded_drafts, torch.where(slot == a, bonus.view(b, 1), -1))
        result = torch.cat([a, tokens], dim=1)
        self.lengths.add_(accepted + 1)
        self.anchors.copy_(bonus)
        return result, logits

    def load_lookups(self, drafts: list[list[int]]) -> None:
        """Rows 0..n-1's lookup drafts (up to B-1 tokens each, empty: none) for the next step; rows n.. none."""
        width = self.block_size - 1
        tokens = torch.zeros(self.batch, width, dtype=torch.long)
        counts = torch.zeros(self.batch, dtype=torch.long)
        for row, draft in enumerate(drafts):
            draft = draft[:width]
            tokens[row, :len(draft)] = torch.tensor(draft, dtype=torch.long)
            counts[row] = len(draft)
        self.lookup_tokens.copy_(tokens)
        self.lookup_counts.copy_(counts)

    def with_lookups(self, drafts: torch.Tensor) -> torch.Tensor:
        """drafts [b, B-1] with each row's first lookup_counts[r] slots replaced by its lookup draft."""
        slot = torch.arange(drafts.shape[1], device=drafts.device).view(1, -1)
        return torch.where(slot < self.lookup_counts.view(-1, 1), self.lookup_tokens, drafts)

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.verify(self.with_lookups(self.draft()) if self.runs_drafter else self.lookup_tokens)


def committed_tokens(result: torch.Tensor) -> list[list[int]]:
    """Host side of a speculative step's result [b, B+1] -> the tokens each row commits."""
    rows = result.tolist()
    return [row[1:row[0] + 2] for row in rows]
