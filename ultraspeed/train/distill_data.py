"""Self-distillation data for the drafter: the target answers prompts itself; we keep its tokens and its
teacher-forced hidden features, cached on disk so training epochs never rerun the target.

The data is built in shards of SHARD_SIZE prompts of one domain, each cached in its own directory
(`code-000000-000050/`, ...): the target writes ~3k tokens a minute on a 2-core CPU, so an interrupted run loses at
most one shard, and asking for more prompts later reuses every full shard of the smaller request (the prompt lists
are prefix-stable) and generates only the new ones. Files in a shard directory:
    sequences.pt   {"spec": ..., "prompt_lens": [...], "tokens": [[...]], "domains": [...], "labels": ...}
    features.npy   float16 [total_tokens, K*H]: concatenated outputs of the drafter's target layers
("labels", only for teacher-forced text from train/corpus_data.py: the target's own greedy prediction at every
position; self-distilled tokens are their own labels.)
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ultraspeed.engine.batch_generate import generate_batch
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.loader import LoadedModel
from ultraspeed.train.prompts import domain_prompts


SHARD_SIZE = 50


@dataclass(frozen=True)
class DistillSpec:
    counts: tuple[tuple[str, int], ...] = (("code", 120), ("math", 200), ("chat", 300), ("agent", 120))
    max_new_tokens: int = 192
    max_prompt_tokens: int = 384
    target_layer_ids: tuple[int, ...] = ()
    model: str = "default"
    weights: str = "checkpoint"     # the target's dense weight format while generating ("int8" on a CPU)


@dataclass(frozen=True)
class Shard:
    """Items [start, stop) of one domain's prompt or text list: the unit of caching (one directory each)."""
    domain: str
    start: int
    stop: int

    @property
    def dirname(self) -> str:
        return f"{self.domain}-{self.start:06d}-{self.stop:06d}"


def shard_bounds(counts, shard_size: int) -> list[tuple[str, int, int]]:
    """(domain, start, stop) at fixed boundaries (multiples of shard_size), so a larger request shares every full
    shard of a smaller one."""
    return [(domain, start, min(start + shard_size, count)) for domain, count in counts
            for start in range(0, count, shard_size)]


@dataclass(frozen=True)
class DistillShard(Shard):
    """A shard of training prompts, and everything else the target's cached responses to them depend on."""
    max_new_tokens: int
    max_prompt_tokens: int
    target_layer_ids: tuple[int, ...]
    model: str
    weights: str


def distill_shards(spec: DistillSpec, shard_size: int = SHARD_SIZE) -> list[DistillShard]:
    common = dict(max_new_tokens=spec.max_new_tokens, max_prompt_tokens=spec.max_prompt_tokens,
                  target_layer_ids=spec.target_layer_ids, model=spec.model, weights=spec.weights)
    return [DistillShard(*bounds, **common) for bounds in shard_bounds(spec.counts, shard_size)]


@dataclass
class DistillData:
    prompt_lens: list[int]
    tokens: list[list[int]]
    domains: list[str]
    offsets: np.ndarray          # [N+1] start of each sequence's rows in features
    features: np.ndarray         # float16 [total_tokens, K*H] (memory-mapped)
    labels: list[list[int]] | None = None   # the target's greedy token per position; None: the tokens are

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def weights(self) -> None:
        return None                  # every sequence drawn equally often (see DataMix.shares)

    def sequence_features(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.features[self.offsets[i]:self.offsets[i + 1]], dtype=np.float32))

    def sequence_labels(self, i: int) -> list[int]:
        """What the drafter should predict at each position of sequence i: the target's greedy token."""
        return self.tokens[i] if self.labels is None else self.labels[i]


class DataMix:
    """Several data sets trained on as one (each keeps its own feature file); same interface as DistillData.

    shares: the fraction of training draws each part gets (e.g. keep the target's own text at a third of every
    step however much teacher-forced text is added); None draws every sequence equally often."""

    def __init__(self, parts: list, shares: list[float] | None = None) -> None:
        if shares is not None and (len(shares) != len(parts) or min(shares) < 0 or sum(shares) <= 0):
            raise ValueError(f"shares {shares} must be one non-negative number per part, not all zero")
        self.parts = parts
        self.index = [(part, i) for part in parts for i in range(len(part))]
        self.weights = None if shares is None else \
            [share / len(part) for part, share in zip(parts, shares) for _ in range(len(part))]
        self.tokens = [t for part in parts for t in part.tokens]
        self.prompt_lens = [n for part in parts for n in part.prompt_lens]
        self.domains = [d for part in parts for d in part.domains]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_tokens(self) -> int:
        return sum(part.num_tokens for part in self.parts)

    def sequence_features(self, i: int) -> torch.Tensor:
        part, j = self.index[i]
        return part.sequence_features(j)

    def sequence_labels(self, i: int) -> list[int]:
        part, j = self.index[i]
        return part.sequence_labels(j)


def load_cached(directory: Path, spec) -> tuple[str, DistillData | None]:
    """(the spec as JSON, the data cached in `directory` if it was built with exactly this spec, else None)."""
    directory.mkdir(parents=True, exist_ok=True)
    seq_path, feat_path = directory / "sequences.pt", directory / "features.npy"
    spec_json = json.dumps(asdict(spec), sort_keys=True)
    if seq_path.exists() and feat_path.exists():
        try:
            saved = torch.load(seq_path)
            if saved["spec"] == spec_json:
                return spec_json, load_saved(saved, feat_path)
            why = "was built with another spec"
        except Exception as e:   # a damaged cache is rebuilt, like a missing one
            why = f"cannot be read ({type(e).__name__}: {e})"
        print(f"drafter data in {directory} {why}; rebuilding", file=sys.stderr)
    return spec_json, None


def build_or_load(loaded: LoadedModel, spec: DistillSpec, directory: Path, batch: int = 16,
                  shard_size: int = SHARD_SIZE) -> DataMix:
    return load_shards(distill_shards(spec, shard_size), directory, "distill",
                       lambda shard, path: build_or_load_shard(loaded, shard, path, batch))


def load_shards(shards: list, directory: Path, name: str,
                build_or_load_one: Callable[[object, Path], "DistillData | None"]) -> DataMix:
    """Every shard's data (each built on first use in directory/<shard.dirname>), shards with nothing usable left
    out. Shared by the self-distilled and the teacher-forced data."""
    parts = [build_or_load_one(shard, directory / shard.dirname)
             for shard in tqdm(shards, desc=f"{name}: shards", unit="shard", disable=len(shards) < 2)]
    return DataMix([part for part in parts if part is not None])


def build_or_load_shard(loaded: LoadedModel, shard: DistillShard, directory: Path, batch: int) -> DistillData | None:
    """One shard of self-distilled data (the target's greedy responses and their features), cached after the
    first call; None when none of its prompts fits max_prompt_tokens."""
    spec_json, cached = load_cached(directory, shard)
    if cached is not None:
        return cached
    tok = loaded.tokenizer
    chosen = domain_prompts(shard.domain, "train", shard.stop)[shard.start:shard.stop]
    prompts = [ids for ids in map(tok.encode_chat, chosen) if len(ids) <= shard.max_prompt_tokens]
    if not prompts:
        return None
    params = SamplingParams(temperature=0.0, max_tokens=shard.max_new_tokens)
    with tqdm(total=len(prompts), desc=f"distill: target answers {shard.dirname}", unit="seq", leave=False) as bar:
        responses = generate_batch(loaded.model, prompts, params, tok.stop_token_ids, max_batch=batch,
                                   on_finish=lambda i, toks: bar.update(1))
    tokens = [p + r for p, r in zip(prompts, responses)]
    feat_path = directory / "features.npy"
    write_features(loaded, tokens, shard.target_layer_ids, feat_path)
    saved = {"spec": spec_json, "prompt_lens": [len(p) for p in prompts], "tokens": tokens,
             "domains": [shard.domain] * len(tokens)}
    return save_sequences(saved, directory)


@torch.inference_mode()
def write_features(loaded: LoadedModel, tokens: list[list[int]], layers: tuple[int, ...], path: Path,
                   with_labels: bool = False) -> list[list[int]] | None:
    """Teacher-forced features of every sequence into `path`; with_labels also returns the target's greedy
    token at each position (position 0 keeps its own token: nothing predicts it)."""
    model = loaded.model
    total = sum(len(t) for t in tokens)
    width = len(layers) * model.config.hidden_size
    out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float16, shape=(total, width))
    cache = model.new_cache(1, max(len(t) for t in tokens))
    row, labels = 0, []
    for ids in tqdm(tokens, desc="distill: teacher-forced target features", unit="seq"):
        cache.reset(0)
        hidden, captured = model(torch.tensor([ids]), cache, capture_layers=layers)
        feats = torch.cat(captured, dim=-1)[0]
        out[row:row + len(ids)] = feats.to(torch.float16).numpy()
        row += len(ids)
        if with_labels:
            labels.append(ids[:1] + model.logits(hidden[:, :-1])[0].argmax(-1).tolist())
    out.flush()
    del out
    path.with_suffix(".tmp.npy").rename(path)
    return labels if with_labels else None


def save_sequences(saved: dict, directory: Path) -> DistillData:
    """Write sequences.pt last and atomically: a shard directory holding it is complete (features.npy is already
    in place), so an interrupted build never leaves a shard that loads half-written."""
    tmp = directory / "sequences.tmp.pt"
    torch.save(saved, tmp)
    tmp.replace(directory / "sequences.pt")
    return load_saved(saved, directory / "features.npy")


def load_saved(saved: dict, feat_path: Path) -> DistillData:
    lens = [len(t) for t in saved["tokens"]]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    features = np.load(feat_path, mmap_mode="r")
    labels = saved.get("labels")
    if features.ndim != 2 or len(features) != offsets[-1] or (labels is not None and len(labels) != len(lens)):
        raise ValueError(f"{feat_path}: {tuple(features.shape)} features for {int(offsets[-1])} tokens")
    return DistillData(saved["prompt_lens"], saved["tokens"], saved["domains"], offsets, features, labels)
