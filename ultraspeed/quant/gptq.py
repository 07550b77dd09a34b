"""Error-compensating MXFP4 rounding (GPTQ) for the expert weights, without training.

Round-to-nearest picks each weight's MXFP4 value on its own. What the layer computes is x @ W.T, and its inputs x
are correlated, so the error of one rounded weight can be cancelled by nudging the weights of the same row that
are still to be rounded, in proportion to how their inputs co-vary (GPTQ, Frantar et al. 2022). With the
inputs' second moment H = E[x x^T] over calibration text, the columns are rounded one at a time, and each
column's rounding error is spread over the later columns through the Cholesky factor of H^-1.

MXFP4 shares one power-of-two scale per 32 weights of a row: a group's scale is chosen (by the same rule as
round-to-nearest) from its weights as they stand when the group is reached, after the corrections of the groups
before it. The result is a float weight whose every value lies on its group's grid, so `quantize_experts` packs
it exactly (tests/quant/test_gptq.py): GPTQ changes which values are chosen, not the format.

What it rounds are MXFP4's targets (quant/apply.expert_targets): a dense model's MLP projections, or a MoE
model's routed experts, where each expert gets its own H from the tokens routed to it (an expert no calibration
token reached is rounded to nearest). The H matrices of a MoE take E x (hidden^2 + intermediate^2) x 8 bytes per
layer, so the layers are calibrated in groups that fit a memory budget, one pass over the calibration text per
group, each group rounded before the next is calibrated (later layers then see the rounded earlier ones, as in
GPTQ's layer-by-layer order).

Where: `ultraspeed serve`'s ultraspeed tier quantizes the experts at start-up with it (about a minute on a 2-core
CPU for the default model, then cached on disk), unless it is given a QAT checkpoint, which recovers more.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from ultraspeed.models.decoder import Decoder
from ultraspeed.models.layers import Linear
from ultraspeed.models.moe import Experts
from ultraspeed.quant.apply import expert_targets, packed_placeholders, quantize_experts
from ultraspeed.quant.mxfp4 import BLOCK_SIZE, block_scale, check_scale_rule, fake_quantize_mxfp4, round_to_grid

MEMORY_BUDGET = 4 << 30      # bytes of H matrices held during one calibration pass


def gptq_targets(model: Decoder) -> dict[str, nn.Module]:
    """MXFP4's targets (quant/apply.expert_targets) while they still hold float weights, by name: a dense model's
    MLP Linears, or a MoE model's routed Experts."""
    targets = {name: model.get_submodule(name) for name in expert_targets(model)}
    return {name: m for name, m in targets.items() if type(m) in (Linear, Experts)}


def target_matrices(name: str, module: nn.Module) -> dict[str, Tensor]:
    """The weights GPTQ rounds in one target, by their state_dict name: a Linear's weight [N, K], or an Experts'
    stacked gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    if isinstance(module, Experts):
        return {f"{name}.gate_up_proj": module.gate_up_proj, f"{name}.down_proj": module.down_proj}
    return {f"{name}.weight": module.weight}


def moment_bytes(module: nn.Module) -> int:
    """Bytes of the fp64 H matrices one target needs: K x K per matrix, per expert."""
    return sum(8 * w.shape[-1] ** 2 * w[..., 0, 0].numel() for w in target_matrices("", module).values())


def memory_groups(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices of `sizes`, grouped so that each group's total stays within `budget` (a single item
    over it gets a group of its own)."""
    groups: list[list[int]] = []
    total = budget + 1
    for i, size in enumerate(sizes):
        if total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


@contextmanager
def recording_moments(targets: dict[str, nn.Module]) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """While active, each forward adds x^T x (fp64) of every target matrix's input to `sums[matrix name]` and
    the number of rows to `counts[matrix name]` (per expert for Experts: the tokens routed to it)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    for name, module in targets.items():
        for key, w in target_matrices(name, module).items():
            sums[key] = torch.zeros(*w.shape[:-2], w.shape[-1], w.shape[-1], dtype=torch.float64)
            counts[key] = torch.zeros(w.shape[:-2], dtype=torch.int64)

    def add(key: str, x: Tensor, e: int | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        index = () if e is None else (e,)
        sums[key][index] += (x.T @ x).double().cpu()        # fp32 products per batch, fp64 totals on the host
        counts[key][index] += x.shape[0]

    def linear_hook(key: str):
        return lambda _module, inputs, _output: add(key, inputs[0])

    def recorded_hidden(name: str, experts: Experts):
        hidden = experts.expert_hidden

        def record(e: int, x: Tensor) -> Tensor:
            h = hidden(e, x)
            add(f"{name}.gate_up_proj", x, e)
            add(f"{name}.down_proj", h, e)
            return h
        return record

    handles = []
    try:
        for name, module in targets.items():
            if isinstance(module, Experts):
                module.expert_hidden = recorded_hidden(name, module)    # shadows the method on this instance
            else:
                handles.append(module.register_forward_hook(linear_hook(f"{name}.weight")))
        yield sums, counts
    finally:
        for h in handles:
            h.remove()
        for module in targets.values():
            module.__dict__.pop("expert_hidden", None)


@torch.no_grad()
def input_second_moments(model: Decoder, windows: list[list[int]], targets: dict[str, nn.Module],
                         desc: str = "gptq: calibration") -> dict[str, Tensor]:
    """H = mean over calibration tokens of x x^T (fp64) for the input x of each matrix of `targets`, by matrix
    name ([K, K], or [E, K, K] over the tokens routed to each expert; zeros for an expert none reached)."""
    device = model.embed_tokens.weight.device
    with recording_moments(targets) as (sums, counts):
        for ids in tqdm(windows, desc=desc, unit="window", leave=False):
            model(torch.tensor([ids], device=device), model.new_cache(1, len(ids)))
    return {key: sums[key] / counts[key].clamp(min=1)[..., None, None] for key in sums}


def gptq_round(weight: Tensor, h: Tensor, scale_rule: str = "mse", damp: float = 0.01,
               block: int = 128) -> Tensor:
    """weight [N, K] (K a multiple of 32) and the input second moment h [K, K] -> the weight rounded to MXFP4
    values with GPTQ's error feedback, as a float tensor of weight's dtype whose 32-wide groups lie on their grid.
    Stacked experts: weight [E, N, K] with h [E, K, K], each expert on its own. An h of zeros (no calibration
    input reached this matrix) gives round-to-nearest. `damp` adds that fraction of the mean diagonal to H (a
    near-singular H would amplify corrections)."""
    check_scale_rule(scale_rule)
    if weight.dim() == 3 and h.dim() == 3 and len(weight) == len(h):
        return torch.stack([gptq_round(w, he, scale_rule, damp, block) for w, he in zip(weight, h)])
    if weight.dim() != 2 or weight.shape[1] % BLOCK_SIZE or h.shape != (weight.shape[1],) * 2:
        raise ValueError(f"gptq_round needs K a multiple of {BLOCK_SIZE} and H [K, K] (or stacked [E, ...] "
                         f"both); got {tuple(weight.shape)} and {tuple(h.shape)}")
    if not h.diagonal().any():
        return fake_quantize_mxfp4(weight.detach(), scale_rule)
    n, k = weight.shape
    w = weight.detach().to("cpu", torch.float64, copy=True)        # on the host whatever the model's device
    h = h.to("cpu", torch.float64, copy=True)
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
    return q.to(weight.device, weight.dtype)


@torch.no_grad()
def gptq_experts(model: Decoder, windows: list[list[int]], scale_rule: str = "mse",
                 memory_budget: int = MEMORY_BUDGET) -> int:
    """Round every float MXFP4 target of `model` (dense MLP projections, or routed experts) in place to MXFP4
    values by GPTQ, calibrated on `windows` (token id lists); `quantize_experts(model, scale_rule)` then packs
    them exactly. Targets are calibrated in groups whose H matrices fit `memory_budget` bytes, each group
    rounded before the next one's pass. Returns how many targets it rounded."""
    targets = gptq_targets(model)
    names = list(targets)
    groups = memory_groups([moment_bytes(targets[n]) for n in names], memory_budget)
    for i, group in enumerate(groups):
        chunk = {names[j]: targets[names[j]] for j in group}
        where = f" {i + 1}/{len(groups)}" if len(groups) > 1 else ""
        moments = input_second_moments(model, windows, chunk, desc=f"gptq: calibration{where}")
        for name, module in tqdm(chunk.items(), desc=f"gptq: rounding{where}", unit="target", leave=False):
            for key, weight in target_matrices(name, module).items():
                weight.copy_(gptq_round(weight, moments[key], scale_rule))
    return len(names)


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


def gptq_on_calibration_text(model: Decoder, tokenizer, scale_rule: str = "mse") -> int:
    """`gptq_experts` on `calibration_windows` (no longer than the model's context); returns targets rounded."""
    window = min(CALIBRATION["window"], model.config.max_position)
    return gptq_experts(model, calibration_windows(tokenizer, window=window), scale_rule)


def gptq_mxfp4_copy(loaded, scale_rule: str = "mse", cache: Path | None = None, in_place: bool = False) -> Decoder:
    """A copy of `loaded.model` (a LoadedModel) whose expert weights (or dense MLP) are MXFP4, rounded by GPTQ on
    `calibration_windows` and packed (`in_place`: `loaded.model` itself, with no second copy in memory). With
    `cache` (a directory), the packed weights are kept there, keyed by the checkpoint file, the rule and the
    calibration, so a later start-up loads them instead of calibrating again."""
    model = loaded.model if in_place else copy.deepcopy(loaded.model)
    targets = gptq_targets(model)
    packed_names = {k for n, m in targets.items() for k in target_matrices(n, m)}
    entry = cache_entry(loaded, scale_rule, cache) if cache is not None and targets else None
    packed = _read_entry(entry, packed_names) if entry is not None else None
    if packed is not None:
        packed_placeholders(model, packed_names)
        model.load_state_dict(packed, strict=False)
        return model
    gptq_on_calibration_text(model, loaded.tokenizer, scale_rule)
    quantize_experts(model, scale_rule)
    if entry is not None:
        prefixes = tuple(f"{n}." for n in targets)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(prefixes)}
            save_file(state, str(entry.with_suffix(".tmp")))
            entry.with_suffix(".tmp").rename(entry)
        except OSError:
            pass                      # caching is an optimisation: a read-only home must not stop serving
    return model


def cache_entry(loaded, scale_rule: str, cache: Path) -> Path:
    """Where the packed weights of `loaded`'s checkpoint file, rounded with `scale_rule` on the calibration, live."""
    source = Path(loaded.source)
    # The checkpoint's files as they are now (a directory: every file in it), so replaced weights recalibrate.
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    stamp = ";".join(f"{p.name}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{source.resolve()}|{stamp}|{scale_rule}|{CALIBRATION}|{MEMORY_BUDGET}|v2".encode())
    return cache / f"{source.stem}-{key.hexdigest()[:16]}.safetensors"


def _read_entry(entry: Path, packed_names: set[str]) -> dict[str, Tensor] | None:
    """The cached packed weights if the entry exists and holds every one of them; None (calibrate again) if it is
    missing or damaged."""
    try:
        packed = load_file(str(entry))
    except Exception:
        return None
    wanted = {f"{name}_{part}" for name in packed_names for part in ("blocks", "scales")}
    return packed if wanted <= packed.keys() else None
