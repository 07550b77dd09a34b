"""DFlash speculative decoding: draft a block in one drafter pass, verify it in one target pass, keep the
longest agreeing prefix plus one target token, roll the KV cache back over the rest.

Each step, for every row b of the batch (cache row b, committed length start_b, anchor = last target token):
    draft   : [anchor, MASK x (B-1)] -> d_1 .. d_{B-1}                      (drafter, one forward)
    verify  : target on [anchor, d_1 .. d_{B-1}] at start_b .. start_b+B-1  (target, one forward)
    accept  : a_b drafts kept; bonus = target's own token after them        (greedy or rejection sampling)
    rollback: crop target cache to start_b + a_b + 1; the kept rows' features feed the drafter's context
Lossless: greedy output equals plain greedy decoding; sampled output follows the target distribution exactly,
because a draft d is accepted with probability p(d) and a rejection resamples from p with d removed — the
rejection rule of speculative sampling for a point-mass proposal.

With `lookups` (one NgramIndex per row), a row whose last tokens recur in its context drafts what followed them
instead (prompt lookup, engine/lookup_draft.py): the rule above holds for any proposal fixed before the target
runs, so this stays lossless; when every row looks up, the drafter does not run that step. A sequence that gave
up on the drafter keeps verifying lookup drafts (lookup_step).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import torch

from ultraspeed.engine.generate import GenerationStats, check_prompt_fits, prefill, take_committed
from ultraspeed.engine.kv_cache import KVCache
from ultraspeed.engine.lookup_corpus import LookupCorpus
from ultraspeed.engine.lookup_draft import NgramIndex
from ultraspeed.engine.sampler import SamplingParams, inverse_cdf, make_generator, sample, token_distribution
from ultraspeed.engine.verify_length import StepCost, choose_verify_length
from ultraspeed.models.decoder import Decoder
from ultraspeed.models.dflash import DFlashDrafter, block_mask


def new_draft_cache(drafter: DFlashDrafter, max_batch: int, max_len: int) -> KVCache:
    c = drafter.config
    ref = drafter.mask_embedding          # a parameter that is never swapped for a packed format
    return KVCache.allocate([(c.num_kv_heads, c.head_dim, c.head_dim)] * c.num_layers, max_batch, max_len,
                            ref.dtype, ref.device)


def append_context(drafter: DFlashDrafter, draft_cache: KVCache, row: int, features: torch.Tensor) -> None:
    """Write the drafter's context K/V for newly committed tokens of one row (features [1, n, K*H])."""
    n = features.shape[1]
    start = int(draft_cache.lengths[row])
    positions = torch.arange(start, start + n, device=features.device).view(1, n)
    for layer, (k, v) in enumerate(drafter.context_kv(features, positions)):
        draft_cache.keys[layer][row, :, start:start + n] = k[0]
        draft_cache.values[layer][row, :, start:start + n] = v[0]
    draft_cache.lengths[row] = start + n


def draft_block(drafter: DFlashDrafter, target: Decoder, draft_cache: KVCache,
                anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """anchors [b] (rows 0..b-1, each at position draft_cache.lengths[row]) -> draft tokens [b, B-1] (argmax)
    and the drafter's probability of each (its confidence, which decides how many are worth verifying)."""
    b, B = anchors.shape[0], drafter.config.block_size
    device = anchors.device
    starts = draft_cache.lengths[:b].to(device)
    embeds = drafter.block_embeddings(target.embed_tokens(anchors).view(b, 1, -1))
    fused = drafter.fused_layers
    if fused is not None and fused.accepts(drafter, embeds, draft_cache, B):   # CPU: each row its own context
        hidden = drafter.norm(fused(embeds, draft_cache, starts))
    else:
        hidden = drafter(embeds, *_block_inputs(drafter, draft_cache, starts))
    confidence, indices = drafter.draft_logits(hidden[:, 1:], target.lm_head.weight).softmax(-1).max(-1)
    return drafter.to_token_ids(indices), confidence


def _block_inputs(drafter: DFlashDrafter, draft_cache: KVCache,
                  starts: torch.Tensor) -> tuple[torch.Tensor, list, torch.Tensor]:
    """The PyTorch drafter's block positions, context keys/values (padded to the longest row) and mask."""
    b, B, device = starts.shape[0], drafter.config.block_size, starts.device
    span = int(draft_cache.lengths[:b].max())
    positions = starts.view(b, 1) + torch.arange(B, device=device).view(1, B)
    key_pos = torch.cat([torch.arange(span, device=device).expand(b, span), positions], dim=1)
    key_block = torch.cat([torch.full((span,), -1, device=device), torch.zeros(B, dtype=torch.long, device=device)])
    mask = block_mask(positions, torch.zeros(B, dtype=torch.long, device=device), starts.view(b, 1).expand(b, B),
                      key_pos, key_block.expand(b, -1), drafter.config.window, drafter.config.causal_in_block)
    context = [(k[:b, :, :span], v[:b, :, :span]) for k, v in zip(draft_cache.keys, draft_cache.values)]
    return positions, context, mask.unsqueeze(1)


def lookup_drafts(lookups: list[NgramIndex | None], slots: int, device: torch.device,
                  drafter: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Each row's lookup draft (up to `slots` tokens) and its estimated acceptance chances, padded to the longest
    ([b, n] each; n = 0 when no row finds one), and which rows found one. Padding and rows without an index or a
    match get chance 0: never worth verifying for themselves."""
    found = [index.draft(slots, drafter) if index is not None else ([], []) for index in lookups]
    width = max(len(tokens) for tokens, _ in found)
    drafts = [tokens + [0] * (width - len(tokens)) for tokens, _ in found]
    chances = [confidence + [0.0] * (width - len(tokens)) for tokens, confidence in found]
    b = len(found)
    return (torch.tensor(drafts, dtype=torch.long, device=device).view(b, width),
            torch.tensor(chances, device=device).view(b, width), [bool(tokens) for tokens, _ in found])


def propose_drafts(drafter: DFlashDrafter, target: Decoder, draft_cache: KVCache, anchors: torch.Tensor,
                   lookups: list[NgramIndex] | None) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Each row's drafts and their estimated acceptance chances ([b, n] each, n <= B-1), and which rows looked
    up: a lookup draft where the row's index finds one, else the drafter's block. The drafter runs only if some
    row needs it."""
    b, slots = anchors.shape[0], drafter.config.block_size - 1
    if lookups is None:
        return (*draft_block(drafter, target, draft_cache, anchors), [False] * b)
    drafts, confidence, looked_up = lookup_drafts(lookups, slots, anchors.device)
    if all(looked_up):
        return drafts, confidence, looked_up
    block, block_confidence = draft_block(drafter, target, draft_cache, anchors)
    pad = (0, slots - drafts.shape[1])
    rows = torch.tensor(looked_up, device=anchors.device).view(b, 1)
    return (torch.where(rows, torch.nn.functional.pad(drafts, pad), block),
            torch.where(rows, torch.nn.functional.pad(confidence, pad), block_confidence), looked_up)


def accept_greedy(drafts: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts [b, B-1], target logits [b, B, V] -> (accepted count a [b], bonus token [b])."""
    targets = logits.argmax(-1)                                   # y_i: target's choice after slot i
    matches = (drafts == targets[:, :-1]).int()
    accepted = matches.cumprod(dim=1).sum(dim=1)                  # longest agreeing prefix
    bonus = targets.gather(1, accepted.view(-1, 1)).view(-1)
    return accepted, bonus


def accept_sampling(drafts: torch.Tensor, logits: torch.Tensor, params: SamplingParams,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling with a point-mass proposal at each draft token (vectorized over rows)."""
    probs = token_distribution(logits, params)                                  # [b, B, V]
    b, slots = drafts.shape
    accept_u = torch.rand(b, slots, generator=generator, device=probs.device)
    draw_u = torch.rand(b, 1, generator=generator, device=probs.device).expand(-1, slots + 1)
    return rejection_sample(drafts, probs, accept_u, draw_u)


def rejection_sample(drafts: torch.Tensor, probs: torch.Tensor, accept_u: torch.Tensor,
                     draw_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule for drafts [b, n] under the target's distributions probs [b, n+1, V], given uniforms
    for the acceptance tests [b, n] and for a draw at each position [b, n+1] (the bonus token, at position a,
    uses draw_u[:, a]) -> (accepted count a [b], bonus token [b]).
    Draft d_i is accepted with probability p_{i-1}(d_i); the first rejected d is resampled from p without d (the
    residual max(p - q, 0) for q = delta_d). A one-hot p (greedy) accepts exactly the argmax prefix and draws the
    argmax. No shape depends on the data: the static step (runtime/static_step.py) runs it inside a graph."""
    b, slots = drafts.shape
    draft_probs = probs[:, :-1].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)   # p_i(d_{i+1})
    accepted = (accept_u < draft_probs).int().cumprod(dim=1).sum(dim=1).long()  # accept d with probability p(d)
    p = probs.gather(1, accepted.view(b, 1, 1).expand(-1, 1, probs.shape[-1])).squeeze(1)   # the bonus's p
    if slots > 0:
        rejected = (accepted < slots).view(-1, 1)
        rejected_token = drafts.gather(1, accepted.clamp(max=slots - 1).view(-1, 1))
        p = torch.where(rejected, p.scatter(1, rejected_token, 0.0), p)
    return accepted, inverse_cdf(p, draw_u.gather(1, accepted.view(b, 1)).view(b))     # it normalizes p


def features_of(captured: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(captured, dim=-1)


def verify_drafts(target: Decoder, cache: KVCache, anchor_ids: torch.Tensor, drafts: torch.Tensor,
                  params: list[SamplingParams], generators: list[torch.Generator | None],
                  capture_layers: tuple[int, ...] = ()) -> tuple[list[list[int]], list[torch.Tensor]]:
    """One target forward over [anchor, drafts] for rows 0..b-1, acceptance per row (greedy prefix or rejection
    sampling with the row's own parameters), and each row's cache cropped to the anchor and its accepted drafts.
    Returns the tokens each row commits (accepted drafts + the target's bonus token) and, if `capture_layers`,
    the target features of the positions kept ([1, a+1, K*H] per row)."""
    b = anchor_ids.shape[0]
    starts = cache.lengths[:b].clone()
    hidden, captured = target(torch.cat([anchor_ids.view(b, 1), drafts], dim=1), cache, capture_layers)
    logits = target.logits(hidden)
    features = features_of(captured) if capture_layers else None
    committed, kept = [], []
    for row in range(b):
        if params[row].greedy:
            accepted, bonus = accept_greedy(drafts[row:row + 1], logits[row:row + 1])
        else:
            accepted, bonus = accept_sampling(drafts[row:row + 1], logits[row:row + 1], params[row], generators[row])
        a = int(accepted[0])
        cache.crop(row, int(starts[row]) + a + 1)                    # keep the anchor and a accepted drafts
        if features is not None:
            kept.append(features[row:row + 1, :a + 1])
        committed.append(drafts[row, :a].tolist() + [int(bonus[0])])
    return committed, kept


def speculative_step(target: Decoder, drafter: DFlashDrafter, cache: KVCache, draft_cache: KVCache,
                     anchors: list[int], pending: list[torch.Tensor], params: list[SamplingParams],
                     generators: list[torch.Generator | None], step_cost: StepCost | None = None,
                     lookups: list[NgramIndex] | None = None,
                     ) -> tuple[list[list[int]], list[torch.Tensor], int, list[bool]]:
    """One draft + verify + accept step for rows 0..b-1 (each may have its own length and sampling params).

    pending[row] holds target features [1, n, K*H] of the row's tokens committed since its last step. With a
    `step_cost`, only the prefix of drafts worth its verification time is verified (engine/verify_length.py);
    without, all drafted. `lookups[row]` indexes the row's committed tokens (the anchor included) for lookup
    drafts; the caller extends it with what the row commits. Returns the tokens each row commits (accepted drafts
    + the target's bonus token, whose last element is the next anchor), the new pending features, the number
    of drafts verified and which rows drafted by lookup.
    """
    b = len(anchors)
    for row in range(b):
        append_context(drafter, draft_cache, row, pending[row])
    anchor_ids = torch.tensor(anchors, device=target.embed_tokens.weight.device)
    drafts, confidence, looked_up = propose_drafts(drafter, target, draft_cache, anchor_ids, lookups)
    if step_cost is not None:
        cost = dataclasses.replace(step_cost, draft=0.0) if all(looked_up) else step_cost
        drafts = drafts[:, :choose_verify_length(confidence, cost)]
    committed, new_pending = verify_drafts(target, cache, anchor_ids, drafts, params, generators,
                                           drafter.config.target_layer_ids)
    for index, tokens, looked in zip(lookups or [], committed, looked_up):
        if index is not None:
            index.record_step(len(tokens), looked)
    return committed, new_pending, drafts.shape[1], looked_up


def lookup_step(target: Decoder, cache: KVCache, anchors: list[int], lookups: list[NgramIndex | None],
                params: list[SamplingParams], generators: list[torch.Generator | None], slots: int,
                step_cost: StepCost | None = None) -> tuple[list[list[int]], int, list[bool]]:
    """A decode step without the drafter: rows whose index finds a lookup draft (up to `slots` tokens) verify it,
    the others decode one token, all in one target forward (with a `step_cost`, only the prefix of drafts worth
    its time). With no lookup draft at all, this is exactly a plain decode step. Returns the tokens each row
    commits, the number of drafts verified and which rows looked up."""
    anchor_ids = torch.tensor(anchors, device=target.embed_tokens.weight.device)
    drafts, confidence, looked_up = lookup_drafts(lookups, slots, anchor_ids.device, drafter=False)
    if step_cost is not None:
        drafts = drafts[:, :choose_verify_length(confidence, dataclasses.replace(step_cost, draft=0.0))]
    committed, _ = verify_drafts(target, cache, anchor_ids, drafts, params, generators)
    return committed, drafts.shape[1], looked_up


# Verifying whole blocks (no step costs measured), a reply on which the drafter commits fewer tokens per step
# than this decodes on plainly: on a CPU a whole block costs about two plain steps.
WHOLE_BLOCK_MIN_ACCEPTED = 2.0


def served_min_accepted(adaptive: bool) -> float | None:
    """The give-up threshold generate and serve use by default: the break-even of the measured step costs (None)
    with adaptive verification, WHOLE_BLOCK_MIN_ACCEPTED with whole blocks."""
    return None if adaptive else WHOLE_BLOCK_MIN_ACCEPTED


def gives_up(stats: GenerationStats, min_accepted: float | None, probe_steps: int,
             step_cost: StepCost | None = None) -> bool:
    """After `probe_steps` speculative steps, is the drafter committing too few tokens per step to pay for
    verification? Then decoding continues plainly from the same state: the output is exactly the same.
    `min_accepted` None: the break-even of the measured step costs (StepCost.break_even); 0: never give up."""
    if len(stats.accepted_lengths) < probe_steps:
        return False
    if min_accepted is None:
        if step_cost is None:
            return False
        min_accepted = step_cost.break_even(stats.drafts_verified)
    return stats.mean_accepted < min_accepted


@torch.inference_mode()
def generate_speculative(target: Decoder, drafter: DFlashDrafter, prompt_ids: list[int], params: SamplingParams,
                         stop_ids: tuple[int, ...] = (), cache: KVCache | None = None,
                         stats: GenerationStats | None = None, min_accepted: float | None = 0.0,
                         probe_steps: int = 4, step_cost: StepCost | None = None,
                         lookup: bool = False, corpus: LookupCorpus | None = None) -> Iterator[list[int]]:
    """Same contract as generate_plain, several tokens per target forward.

    `step_cost` (measure_step_cost) lets each step verify only the drafts worth their time; None verifies whole
    blocks, which is what a GPU wants anyway. `lookup` drafts from n-gram matches in the context where there
    are some (prompt lookup), else from the `corpus` of the target's earlier answers where it has a match, from
    the drafter elsewhere.

    If after `probe_steps` steps the drafter commits fewer than `min_accepted` tokens per step, verification
    costs more than it saves: the rest is decoded plainly from the same state (still exact), verifying only
    lookup drafts, where `lookup` finds some. 0 = never; None = the break-even of `step_cost` (never without one).
    """
    B = drafter.config.block_size
    stats = stats if stats is not None else GenerationStats()
    cache = cache if cache is not None else target.new_cache(1, len(prompt_ids) + params.max_tokens + B)
    cache.reset(0)
    room = check_prompt_fits(len(prompt_ids), cache, target)
    max_new = min(params.max_tokens, room - B) if room > B else 0
    if max_new <= 0:
        # Too little room for a verify block: plain decoding can still finish the job.
        from ultraspeed.engine.generate import generate_plain
        yield from generate_plain(target, prompt_ids, params, stop_ids, cache, stats)
        return
    generator = make_generator(params.seed, target.embed_tokens.weight.device)
    stop = set() if params.ignore_eos else set(stop_ids)
    draft_cache = new_draft_cache(drafter, 1, cache.max_len)
    stats.prompt_tokens = len(prompt_ids)

    t0 = time.perf_counter()
    logits, captured = prefill(target, cache, prompt_ids, capture_layers=drafter.config.target_layer_ids)
    new_tokens = [int(sample(logits, params, generator))]
    pending = [features_of(captured)]
    index = NgramIndex.of(prompt_ids + new_tokens, corpus) if lookup else None
    stats.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = False
    while True:
        out, done = take_committed(new_tokens, stats, stop, max_new, t0)
        yield out
        if done:
            return
        if plain:    # the drafter is off; lookup drafts, which cost no drafter forward, are still verified
            committed, _, looked_up = lookup_step(target, cache, [new_tokens[-1]], [index], [params], [generator],
                                                  B - 1, step_cost)
        else:
            committed, pending, verified, looked_up = speculative_step(
                target, drafter, cache, draft_cache, [new_tokens[-1]], pending, [params], [generator], step_cost,
                [index] if index is not None else None)
            stats.drafts_verified.append(verified)
        new_tokens = committed[0]
        stats.lookup_steps += looked_up[0]
        if index is not None:
            index.extend(new_tokens)
        stats.target_forwards += 1
        stats.accepted_lengths.append(len(new_tokens))
        if not plain and gives_up(stats, min_accepted, probe_steps, step_cost):
            plain, stats.plain_after = True, stats.target_forwards
