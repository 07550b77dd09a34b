"""MXFP4 quantization-aware training of the expert weights, by distillation from the original model.

The student is the model with its expert targets wrapped for fake quantization (quant/apply.py): its forward
uses Q(W), the straight-through gradient trains the high-precision master weights W. Everything else (attention,
router, norms, embeddings, LM head) is frozen, so the exported checkpoint is the original model plus MXFP4
experts, and the optimizer holds state for the expert weights only.

Loss: KL(teacher || student) over the vocabulary at every position, the teacher being the unquantized original
(quantization-aware distillation, as ModelOpt's QAD). The target is "behave like the original", not "fit this
text", so the held-out perplexity gap measures recovered quantization loss rather than domain fine-tuning, and
real text of any origin serves as input: no generation from the model is needed, which on a small shared CPU
would cost far more than training.

Export (`export_qat`) packs the master weights with the very quantizer the forward used (same scale rule, same
ties), so the checkpoint's decoded weights equal the last training forward's weights bit for bit.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ultraspeed.errors import UltraSpeedError
from ultraspeed.models.decoder import Decoder
from ultraspeed.quant.apply import expert_targets, fake_quantize_experts, quantize_experts
from ultraspeed.quant.mxfp4 import ScaleRule

STATE_FILE = "qat_state.pt"


@dataclass(frozen=True)
class QATConfig:
    steps: int = 100
    lr: float = 1e-4              # Adam; short CPU runs sit at the top of the 1e-5..1e-4 range used for gpt-oss
    seq_len: int = 256
    seqs_per_step: int = 2
    grad_clip: float = 1.0
    scale_rule: ScaleRule = "ceil"
    checkpoint_every: int = 25
    seed: int = 0
    source: str = ""              # the model trained (its path): a resume on another model is refused


def distill_loss(student: Decoder, teacher: Decoder, ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) for token windows ids [B, T]."""
    with torch.no_grad():
        hidden, _ = teacher(ids, teacher.new_cache(ids.shape[0], ids.shape[1]))
        target = F.log_softmax(teacher.logits(hidden).float(), dim=-1).flatten(0, 1)
    hidden, _ = student(ids, student.new_cache(ids.shape[0], ids.shape[1]))
    log_probs = F.log_softmax(student.logits(hidden).float(), dim=-1).flatten(0, 1)
    return F.kl_div(log_probs, target, log_target=True, reduction="batchmean")


def master_weights(student: Decoder) -> dict[str, torch.nn.Parameter]:
    """The trained master weights by state_dict name (the wrappers keep the original names)."""
    targets = tuple(f"{name}." for name in expert_targets(student))
    return {name: p for name, p in student.named_parameters() if name.startswith(targets)}


def train_qat(student: Decoder, teacher: Decoder, windows: list[list[int]], cfg: QATConfig, out: Path,
              log=print) -> Decoder:
    """Fake-quantize the student's expert targets and train them for cfg.steps steps on `windows` (token lists
    of cfg.seq_len). Resumes from out/qat_state.pt; saves it every cfg.checkpoint_every steps and at the end.
    Returns the student, still fake-quantized (see `export_qat`)."""
    if not windows:
        raise ValueError("QAT needs at least one token window")
    student.requires_grad_(False)
    fake_quantize_experts(student, cfg.scale_rule)
    masters = master_weights(student)
    for p in masters.values():
        p.requires_grad_(True)
    teacher.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(masters.values(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)

    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    start = 0
    if state_path.exists():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            with torch.no_grad():
                for name, p in masters.items():
                    p.copy_(state["masters"][name])
            optimizer.load_state_dict(state["optimizer"])
            start, saved = state["step"], state.get("config", {})
        except Exception as e:
            raise UltraSpeedError(f"{state_path}: cannot resume from it ({type(e).__name__}: {e}); move {out} away "
                                  "to start over") from None
        # Only the length of the run and its checkpoints may change on resume; anything else would mix two runs.
        changed = [k for k, v in asdict(cfg).items() if k not in ("steps", "checkpoint_every") and k in saved
                   and saved[k] != v]
        if changed:
            raise UltraSpeedError(f"{state_path} was trained with other settings ({', '.join(changed)}); resume with "
                                  "the same flags, or use another --out")
        if start > cfg.steps:
            raise UltraSpeedError(f"{state_path} has trained {start} steps already; --steps must be at least that")
        log(f"qat: resumed from {state_path} at step {start}")

    def save(step: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"step": step, "config": asdict(cfg), "optimizer": optimizer.state_dict(),
                    "masters": {n: p.detach() for n, p in masters.items()}}, tmp)
        tmp.replace(state_path)

    student.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="qat", unit="step")
    t0, ema = time.perf_counter(), None
    for step in bar:
        # The batch depends only on (seed, step): a resumed run sees the same data without saving RNG state.
        rng = random.Random(cfg.seed * 1_000_003 + step)
        ids = torch.tensor(rng.sample(windows, min(cfg.seqs_per_step, len(windows))))
        loss = distill_loss(student, teacher, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(masters.values()), cfg.grad_clip)
        optimizer.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        bar.set_postfix(kl=f"{ema:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save(step + 1)
    if cfg.steps > start:
        log(f"qat: {cfg.steps - start} steps in {time.perf_counter() - t0:.0f} s, final KL (ema) {ema:.4f}")
    student.requires_grad_(False)
    return student.eval()


def export_qat(student: Decoder, scale_rule: ScaleRule) -> Decoder:
    """Pack the trained master weights in place, with the quantizer the training forward used."""
    return quantize_experts(student, scale_rule)
