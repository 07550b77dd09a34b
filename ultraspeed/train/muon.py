"""Muon for CPUs: momentum, then an orthogonalised update from a quintic Newton-Schulz iteration.

torch.optim.Muon runs the Newton-Schulz iteration in bfloat16; CPUs without bf16 matrix instructions (ours:
AVX2 only) emulate it roughly a hundred times slower than fp32. On CUDA `make_muon` returns torch.optim.Muon;
elsewhere this fp32 version, with the same update rule and the "match_rms_adamw" learning-rate scale.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for g = U S V^T (the nearest semi-orthogonal matrix), by Newton-Schulz."""
    a, b, c = NS_COEFFICIENTS
    x = g / (g.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class CPUMuon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                # Scale so the update's RMS matches AdamW's (~0.2), letting both optimizers share a learning rate.
                scale = 0.2 * math.sqrt(max(p.shape))
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(orthogonalize(update, group["ns_steps"]), alpha=-group["lr"] * scale)


def make_muon(params: list[torch.Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if params and params[0].is_cuda:
        return torch.optim.Muon(params, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return CPUMuon(params, lr=lr, weight_decay=weight_decay)
