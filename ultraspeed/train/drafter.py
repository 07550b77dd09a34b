"""Training the DFlash drafter on cached self-distillation data.

One training example = one sequence with `anchors_per_seq` random anchor positions a_n inside the response.
Block n is [token(a_n), MASK x (B-1)] at positions a_n .. a_n+B-1 and slot k is trained to predict the target's
token at a_n+k (same-position labels; slot 0 carries no loss). All blocks of a sequence run in one drafter
forward with the parallel-block mask from `block_mask` (context strictly before the anchor, own block only),
the exact rule used at inference. Loss: cross-entropy with per-slot weight exp(-(k-1)/gamma).
Optimizers: Muon for 2-D weight matrices, AdamW for norms and the mask vector.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.decoder import Decoder
from ultraspeed.models.dflash import DFlashDrafter, block_mask, save_drafter
from ultraspeed.train.distill_data import DataMix, DistillData
from ultraspeed.train.muon import make_muon


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    seqs_per_step: int = 4
    anchors_per_seq: int = 24
    lr_muon: float = 2e-3
    lr_adam: float = 3e-3
    warmup: float = 0.04
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    max_context: int = 640           # sequences are cut to this many tokens (bounds attention cost)


def sample_anchors(prompt_len: int, seq_len: int, block: int, count: int, rng: random.Random) -> list[int]:
    """Anchor positions inside the response, each with a full block of labels after it."""
    lo, hi = max(prompt_len - 1, 0), seq_len - block
    if hi < lo:
        return []
    candidates = range(lo, hi + 1)
    return sorted(rng.sample(candidates, min(count, len(candidates))))


def pick_sequences(usable: list[int], weights: list[float] | None, count: int, rng: random.Random) -> list[int]:
    """count sequence indices for one step: distinct and uniform, or drawn by weight (a DataMix's shares)."""
    if weights is None:
        return rng.sample(usable, min(count, len(usable)))
    return rng.choices(usable, weights=[weights[i] for i in usable], k=count)


def block_loss(drafter: DFlashDrafter, target: Decoder, tokens: torch.Tensor, features: torch.Tensor,
               anchors: list[int], labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Loss for one sequence. tokens [S], features [S, K*H], labels [S] (the target's greedy token at each
    position; default: the tokens, which the target generated itself); returns weighted CE and accuracy stats.

    Slot k's label is what the target says after the tokens before it. When those tokens are text the target
    would not have written (teacher-forced corpus), that label answers a context decoding never reaches: the
    drafter only sees masks there, and a draft is only verified after the target's own choices. So slot k counts
    only while tokens a+1 .. a+k-1 agree with the labels (always, for self-distilled data)."""
    c = drafter.config
    B, S, n = c.block_size, tokens.shape[0], len(anchors)
    anchor_t = torch.tensor(anchors)
    slot = torch.arange(B)
    positions = (anchor_t.view(n, 1) + slot.view(1, B)).view(1, n * B)
    query_block = torch.arange(n).repeat_interleave(B)
    key_pos = torch.cat([torch.arange(S), positions[0]])
    key_block = torch.cat([torch.full((S,), -1), query_block])
    mask = block_mask(positions[0], query_block, anchor_t.repeat_interleave(B), key_pos, key_block, c.window,
                      c.causal_in_block)
    context = drafter.context_kv(features.unsqueeze(0), torch.arange(S).view(1, S))
    with torch.no_grad():
        anchor_embeds = target.embed_tokens(tokens[anchor_t]).unsqueeze(0)
    embeds = drafter.block_embeddings(anchor_embeds)
    hidden = drafter(embeds, positions, context, mask.view(1, 1, n * B, -1))
    hidden = hidden.view(n, B, -1)[:, 1:]                              # slot 0 is the known anchor
    logits = drafter.draft_logits(hidden, target.lm_head.weight)       # frozen head, grads flow to hidden
    labels = tokens if labels is None else labels
    block_pos = positions.view(n, B)
    on_path = on_target_path(tokens[block_pos], labels[block_pos]).reshape(-1).float()
    labels = draft_labels(drafter, labels[block_pos[:, 1:]])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).clamp(min=0),
                         reduction="none")
    in_vocab = (labels.reshape(-1) >= 0).float()                      # a label outside the draft vocab: no loss
    weights = torch.exp(-(slot[1:].float() - 1) / c.loss_decay_gamma).repeat(n) * in_vocab * on_path
    loss = (ce * weights).sum() / weights.sum().clamp(min=1e-6)
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels).int()
        accepted = correct.cumprod(dim=1).sum(dim=1).float() + 1      # tokens per step if drafted like this
    return loss, {"acc1": correct[:, 0].float().mean().item(), "tau": accepted.mean().item()}


def on_target_path(block_tokens: torch.Tensor, block_labels: torch.Tensor) -> torch.Tensor:
    """[n, B] tokens and labels of each block (slot 0 = anchor) -> [n, B-1] bool: slot k >= 1 is on the path
    decoding can reach, i.e. the tokens at slots 1 .. k-1 are the target's own greedy choices."""
    agree = (block_tokens[:, 1:-1] == block_labels[:, 1:-1]).int()
    first = torch.ones_like(agree[:, :1])
    return torch.cat([first, agree.cumprod(dim=1)], dim=1).bool()


def draft_labels(drafter: DFlashDrafter, token_ids: torch.Tensor) -> torch.Tensor:
    """Token ids -> indices into the draft vocabulary (-1 where a token is outside it)."""
    if drafter.draft_vocab is None:
        return token_ids
    index = torch.full((drafter.config.vocab_size,), -1, dtype=torch.long)
    index[drafter.draft_vocab] = torch.arange(len(drafter.draft_vocab))
    return index[token_ids]


def frequent_tokens(sequences: list[list[int]], count: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The `count` most frequent token ids in the data (plus `always`, e.g. stop tokens), for a draft vocab:
    exactly `count` ids (ids the data never shows fill the rest; `count` must not exceed the vocabulary), so the
    drafter's saved vocabulary always matches its config."""
    counts = torch.bincount(torch.tensor([t for s in sequences for t in s]), minlength=count)
    for t in always:
        if t < len(counts):
            counts[t] = counts.max() + 1
    return counts.argsort(descending=True)[:count].sort().values


def make_optimizers(drafter: DFlashDrafter, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    matrices = [p for p in drafter.parameters() if p.ndim == 2]
    others = [p for p in drafter.parameters() if p.ndim != 2]
    return [make_muon(matrices, lr=cfg.lr_muon),
            torch.optim.AdamW(others, lr=cfg.lr_adam, weight_decay=0.0)]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return 0.5 * (1 + math.cos(math.pi * progress)) * 0.95 + 0.05


def target_identity(target: Decoder) -> str:
    """What a checkpoint records of the target it was trained against (a resume against another is refused)."""
    c = target.config
    return f"{c.arch}, hidden {c.hidden_size}, {c.num_layers} layers, vocab {c.vocab_size}"


def train(drafter: DFlashDrafter, target: Decoder, data: DistillData | DataMix, cfg: TrainConfig, out_dir: Path,
          log=print) -> DFlashDrafter:
    """Train with checkpoints in out_dir (resumed automatically); writes out_dir/drafter.safetensors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    optimizers = make_optimizers(drafter, cfg)
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    step = 0
    target_id = target_identity(target)
    if ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path)
            trained_for = ckpt.get("target")
            drafter.load_state_dict(ckpt["drafter"])
            for opt, state in zip(optimizers, ckpt["optimizers"]):
                opt.load_state_dict(state)
            step = ckpt["step"]
        except Exception as e:
            raise UltraSpeedError(f"{ckpt_path}: cannot resume from it ({type(e).__name__}: {e}); move {out_dir} "
                                  "away to start over") from None
        if trained_for is not None and trained_for != target_id:
            raise UltraSpeedError(f"{ckpt_path} was trained against another target ({trained_for}, this one is "
                                  f"{target_id}); use another --out")
        log(f"resumed from {ckpt_path} at step {step}")
    target.requires_grad_(False)
    drafter.train().requires_grad_(True)
    usable = [i for i in range(len(data)) if len(data.tokens[i]) - data.prompt_lens[i] > drafter.config.block_size]
    bar = tqdm(total=cfg.steps, initial=step, desc="train-drafter", unit="step")
    recent: list[dict] = []
    t_start = time.time()
    while step < cfg.steps:
        # Seeded by the step, not once: a resumed run draws what an uninterrupted one would have.
        rng = random.Random(cfg.seed * 1_000_003 + step)
        for opt, lrs in zip(optimizers, base_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * lr_factor(step, cfg)
        total, stats = 0.0, []
        for i in pick_sequences(usable, data.weights, cfg.seqs_per_step, rng):
            seq_len = min(len(data.tokens[i]), cfg.max_context)
            tokens = torch.tensor(data.tokens[i][:seq_len])
            anchors = sample_anchors(data.prompt_lens[i], seq_len, drafter.config.block_size, cfg.anchors_per_seq, rng)
            if not anchors:
                continue
            labels = torch.tensor(data.sequence_labels(i)[:seq_len])
            loss, st = block_loss(drafter, target, tokens, data.sequence_features(i)[:seq_len], anchors, labels)
            (loss / cfg.seqs_per_step).backward()
            total += loss.item() / cfg.seqs_per_step
            stats.append(st)
        if not math.isfinite(total):     # e.g. damaged cached features: stop before a NaN drafter is saved
            raise UltraSpeedError(f"training loss is {total} at step {step + 1}: the cached data may be damaged "
                                  "(rebuild it: move --data-dir / --corpus-dir away); nothing was saved past the last "
                                  "checkpoint")
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        recent = (recent + [{"loss": total, **{k: sum(s[k] for s in stats) / max(1, len(stats)) for k in ("acc1", "tau")}}])[-50:]
        avg = {k: sum(r[k] for r in recent) / len(recent) for k in recent[0]}
        bar.set_postfix(loss=f"{avg['loss']:.3f}", acc1=f"{avg['acc1']:.3f}", tau=f"{avg['tau']:.2f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            # Each file under a temporary name first: a run killed while saving keeps its last checkpoint.
            save_drafter(drafter, out_dir / "drafter.safetensors.tmp",
                         {"train_step": str(step), "train_tau": f"{avg['tau']:.3f}", "train_loss": f"{avg['loss']:.4f}"})
            torch.save({"drafter": drafter.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                        "step": step, "train_config": asdict(cfg), "target": target_id}, ckpt_path.with_suffix(".tmp"))
            (out_dir / "drafter.safetensors.tmp").replace(out_dir / "drafter.safetensors")
            ckpt_path.with_suffix(".tmp").replace(ckpt_path)
            log(f"step {step}: loss {avg['loss']:.4f} acc1 {avg['acc1']:.3f} tau {avg['tau']:.2f} "
                f"({time.time() - t_start:.0f}s)")
    bar.close()
    return drafter.eval().requires_grad_(False)
