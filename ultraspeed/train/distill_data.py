"""Self-distillation data for the drafter: the target answers prompts itself; we keep its tokens and its
teacher-forced hidden features, cached on disk so training epochs never rerun the target.

Files in the data directory:
    sequences.pt   {"spec": ..., "prompt_lens": [...], "tokens": [[...]], "domains": [...], "labels": ...}
    features.npy   float16 [total_tokens, K*H]: concatenated outputs of the drafter's target layers
("labels", only for teacher-forced text from train/corpus_data.py: the target's own greedy prediction at every
position; self-distilled tokens are their own labels.)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ultraspeed.engine.batch_generate import generate_batch
from ultraspeed.engine.sampler import SamplingParams
from ultraspeed.loader import LoadedModel
from ultraspeed.train.prompts import domain_prompts


@dataclass(frozen=True)
class DistillSpec:
    counts: tuple[tuple[str, int], ...] = (("code", 120), ("math", 200), ("chat", 300), ("agent", 120))
    max_new_tokens: int = 192
    max_prompt_tokens: int = 384
    target_layer_ids: tuple[int, ...] = ()
    model: str = "default"
    weights: str = "checkpoint"     # the target's dense weight format while generating ("int8" on a CPU)


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
        saved = torch.load(seq_path)
        if saved["spec"] == spec_json:
            return spec_json, load_saved(saved, feat_path)
        print(f"drafter data in {directory} was built with another spec; rebuilding")
    return spec_json, None


def build_or_load(loaded: LoadedModel, spec: DistillSpec, directory: Path, batch: int = 16) -> DistillData:
    spec_json, cached = load_cached(directory, spec)
    if cached is not None:
        return cached
    seq_path, feat_path = directory / "sequences.pt", directory / "features.npy"
    tok = loaded.tokenizer
    prompts, domains = [], []
    for domain, count in spec.counts:
        for messages in domain_prompts(domain, "train", count):
            ids = tok.encode_chat(messages)
            if len(ids) <= spec.max_prompt_tokens:
                prompts.append(ids)
                domains.append(domain)
    responses = _generate_resumable(loaded, prompts, spec, spec_json, directory / "responses.partial.pt", batch)
    tokens = [p + r for p, r in zip(prompts, responses)]
    write_features(loaded, tokens, spec.target_layer_ids, feat_path)
    saved = {"spec": spec_json, "prompt_lens": [len(p) for p in prompts], "tokens": tokens, "domains": domains}
    torch.save(saved, seq_path)
    (directory / "responses.partial.pt").unlink(missing_ok=True)
    return load_saved(saved, feat_path)


def _generate_resumable(loaded: LoadedModel, prompts: list[list[int]], spec: DistillSpec, spec_json: str,
                        partial: Path, batch: int) -> list[list[int]]:
    """The target's greedy responses, generated in chunks of a few batches; each finished chunk is saved to
    `partial`, so an interrupted run (hours on a CPU) resumes where it stopped instead of starting over."""
    done: list[list[int]] = []
    if partial.exists():
        saved = torch.load(partial)
        if saved["spec"] == spec_json:
            done = saved["responses"]
    params = SamplingParams(temperature=0.0, max_tokens=spec.max_new_tokens)
    bar = tqdm(total=len(prompts), initial=len(done), desc="distill: target generates responses", unit="seq")
    chunk = 4 * batch
    while len(done) < len(prompts):
        todo = prompts[len(done):len(done) + chunk]
        done += generate_batch(loaded.model, todo, params, loaded.tokenizer.stop_token_ids, max_batch=batch,
                               on_finish=lambda i, toks: bar.update(1))
        torch.save({"spec": spec_json, "responses": done}, partial.with_suffix(".tmp"))
        partial.with_suffix(".tmp").replace(partial)
    bar.close()
    return done


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


def load_saved(saved: dict, feat_path: Path) -> DistillData:
    lens = [len(t) for t in saved["tokens"]]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    features = np.load(feat_path, mmap_mode="r")
    return DistillData(saved["prompt_lens"], saved["tokens"], saved["domains"], offsets, features, saved.get("labels"))
