"""Error-compensating MXFP4 rounding (GPTQ) for the MLP weights of a dense model, without training.

Round-to-nearest picks each weight's MXFP4 value on its own. What the layer computes is x @ W.T, and its inputs x
are correlated, so the error of one rounded weight can be cancelled by nudging the weights of the same row that
are still to be rounded, in proportion to how their inputs co-vary (GPTQ, Frantar et al. 2022). With the
inputs' second moment H = E[x x^T] over calibration text, the columns are rounded one at a time, and each
column's rounding error is spread over the later columns through the Cholesky factor of H^-1.

MXFP4 shares one power-of-two scale per 32 weights of a row: a group's scale is chosen (by the same rule as
round-to-nearest) from its weights as they stand when the group is reached, after the corrections of the groups
before it. The result is a float weight whose every value lies on its group's grid, so `quantize_experts` packs
it exactly (tests/quant/test_gptq.py): GPTQ changes which values are chosen, not the format.

Where: `ultraspeed serve`'s ultraspeed tier quantizes a dense model's MLP at start-up with it (about a minute on
a 2-core CPU for the default model, then cached on disk), unless it is given a QAT checkpoint, which recovers more. MoE experts are left to
round-to-nearest here (each expert would need its own routed inputs).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from ultraspeed.models.decoder import Decoder
from ultraspeed.models.layers import Linear
from ultraspeed.quant.apply import expert_targets, packed_placeholders, quantize_experts
from ultraspeed.quant.mxfp4 import BLOCK_SIZE, block_scale, check_scale_rule, round_to_grid


def mlp_linears(model: Decoder) -> dict[str, Linear]:
    """The dense MLP projections MXFP4 applies to (quant/apply.expert_targets: a dense model's MLPs; a MoE model
    has none, its dense layers stay unquantized), by name, while they still hold float weights."""
    return {name: model.get_submodule(name) for name in expert_targets(model)
            if type(model.get_submodule(name)) is Linear}


@torch.no_grad()
def input_second_moments(model: Decoder, windows: list[list[int]], names: list[str]) -> dict[str, Tensor]:
    """H = mean over calibration tokens of x x^T (fp64) for the input x of each named linear."""
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name: str):
        def accumulate(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x.T @ x).double()     # fp32 products per window, fp64 totals
            counts[name] += x.shape[0]
        return accumulate

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for ids in tqdm(windows, desc="gptq: calibration", unit="window", leave=False):
            model(torch.tensor([ids]), model.new_cache(1, len(ids)))
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in names}


def gptq_round(weight: Tensor, h: Tensor, scale_rule: str = "mse", damp: float = 0.01,
               block: int = 128) -> Tensor:
    """weight [N, K] (K a multiple of 32) and the input second moment h [K, K] -> the weight rounded to MXFP4
    values with GPTQ's error feedback, as a float tensor of weight's dtype whose 32-wide groups lie on their grid.
    `damp` adds that fraction of the mean diagonal to H (a near-singular H would amplify corrections)."""
    check_scale_rule(scale_rule)
    n, k = weight.shape
    if k % BLOCK_SIZE or h.shape != (k, k):
        raise ValueError(f"gptq_round needs K a multiple of {BLOCK_SIZE} and H [K, K]; got {tuple(weight.shape)} "
                         f"and {tuple(h.shape)}")
    w = weight.detach().double().clone()
    h = h.double().clone()
    dead = torch.diag(h) == 0                  # inputs that are always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    # Upper Cholesky factor of H^-1: row j holds how column j's error moves the columns after it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    scale = torch.ones(n, 1, dtype=w.dtype)
    for start in range(0, k, block):
        end = min(start + block, k)
        errors = torch.zeros(n, end - start, dtype=w.dtype)
        for j in range(start, end):
            if j % BLOCK_SIZE == 0:           # a new group: its scale from its weights as they stand now
                group = w[:, j:j + BLOCK_SIZE].abs()
                scale = block_scale(group, group.amax(-1), scale_rule)
            column = w[:, j:j + 1]
            rounded = round_to_grid(column, scale)
            q[:, j:j + 1] = rounded
            err = (column - rounded) / hinv[j, j]
            w[:, j + 1:end] -= err * hinv[j, j + 1:end]
            errors[:, j - start:j - start + 1] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return q.to(weight.dtype)


@torch.no_grad()
def gptq_mlp(model: Decoder, windows: list[list[int]], scale_rule: str = "mse") -> int:
    """Round every dense MLP projection of `model` in place to MXFP4 values by GPTQ, calibrated on `windows`
    (token id lists); `quantize_experts(model, scale_rule)` then packs them exactly. Returns how many projections
    it rounded (0 for a MoE model, whose experts are left to round-to-nearest)."""
    linears = mlp_linears(model)
    if not linears:
        return 0
    moments = input_second_moments(model, windows, list(linears))
    for name, linear in tqdm(linears.items(), desc="gptq: rounding", unit="matrix", leave=False):
        linear.weight.copy_(gptq_round(linear.weight, moments[name], scale_rule))
    return len(linears)


# ------------------------------------------------------------------------------------------ serving


CALIBRATION = {"texts_per_domain": 8, "window": 512}      # ~8k tokens of training-split chat and code


def calibration_windows(tokenizer, texts_per_domain: int = CALIBRATION["texts_per_domain"],
                        window: int = CALIBRATION["window"]) -> list[list[int]]:
    """Token windows of the training splits (ShareGPT first turns, HumanEval tasks 0-119), never the held-out
    text the quantization bench scores: `texts_per_domain` windows of each domain."""
    from ultraspeed.train.text_corpus import corpus_texts, token_windows
    separator = tokenizer.token_id(tokenizer.eos_token)
    texts = corpus_texts("train", 300)
    return [w for domain_texts in texts.values()
            for w in token_windows([tokenizer.encode(t) for t in domain_texts], window, separator)[:texts_per_domain]]


def gptq_mxfp4_copy(loaded, scale_rule: str = "mse", cache: Path | None = None) -> Decoder:
    """A copy of `loaded.model` (a LoadedModel) whose dense MLP weights are MXFP4, rounded by GPTQ on
    `calibration_windows` and packed. With `cache` (a directory), the packed weights are kept there, keyed by the
    checkpoint file, the rule and the calibration, so a later start-up loads them instead of calibrating again."""
    model = copy.deepcopy(loaded.model)
    names = list(mlp_linears(model))
    prefixes = tuple(f"{n}." for n in names)
    entry = None
    if cache is not None and names:
        source = Path(loaded.source)
        stamp = f"{source.stat().st_size}|{source.stat().st_mtime_ns}" if source.is_file() else ""
        key = hashlib.sha256(f"{source.resolve()}|{stamp}|{scale_rule}|{CALIBRATION}|v1".encode()).hexdigest()[:16]
        entry = cache / f"{source.stem}-{key}.safetensors"
        if entry.exists():
            try:
                packed = load_file(str(entry))
                packed_placeholders(model, {f"{n}.weight" for n in names})
                missing = model.load_state_dict(packed, strict=False).missing_keys
                if not any(k.startswith(prefixes) for k in missing):
                    return model
            except Exception:
                pass                  # a damaged entry: calibrate again below
            model = copy.deepcopy(loaded.model)
    window = min(CALIBRATION["window"], model.config.max_position)
    gptq_mlp(model, calibration_windows(loaded.tokenizer, window=window), scale_rule)
    quantize_experts(model, scale_rule)
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(prefixes)}
            save_file(state, str(entry.with_suffix(".tmp")))
            entry.with_suffix(".tmp").rename(entry)
        except OSError:
            pass                      # caching is an optimisation: a read-only home must not stop serving
    return model
