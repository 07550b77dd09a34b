"""Teacher-forced drafter data from existing text: ShareGPT first exchanges and HumanEval solutions (training
splits only), run through the target once, never generated.

Self-distillation (train/distill_data.py) makes the target write every token, which on a 2-core CPU yields a few
tens of thousands of tokens an hour. A teacher-forced forward over text that already exists is ~10x cheaper per
token, so the drafter can see many more contexts (EAGLE's recipe). The text is not the target's, but the labels
are: at every position the label is the target's own greedy prediction there, so the drafter still learns to
predict the target, which is all verification rewards. Same files and loader as distill_data.

The corpus is built in shards of SHARD_SIZE conversations, each cached in its own directory: an interrupted build
(an hour or more on a CPU) loses at most one shard, and a larger corpus reuses every shard it shares with a
smaller one (the conversation lists are prefix-stable), so growing --corpus-chat only runs the new text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ultraspeed.loader import LoadedModel
from ultraspeed.train.distill_data import (DataMix, DistillData, Shard, load_cached, load_shards, save_sequences,
                                          shard_bounds, write_features)
from ultraspeed.train.prompts import HUMANEVAL_TRAIN, chat_exchanges, code_task_prompt, humaneval_tasks

SHARD_SIZE = 200


@dataclass(frozen=True)
class CorpusSpec:
    chat: int = 1000                 # ShareGPT first exchanges (training split)
    code: int = 120                  # HumanEval training tasks, answered with their canonical solution
    max_tokens: int = 512            # sequences are cut here (bounds the forward and the features on disk)
    target_layer_ids: tuple[int, ...] = ()
    model: str = "default"
    weights: str = "checkpoint"


@dataclass(frozen=True)
class ShardSpec(Shard):
    """A shard of conversations, and everything else their cached forwards depend on."""
    max_tokens: int
    target_layer_ids: tuple[int, ...]
    model: str
    weights: str


def corpus_shards(spec: CorpusSpec, shard_size: int = SHARD_SIZE) -> list[ShardSpec]:
    common = dict(max_tokens=spec.max_tokens, target_layer_ids=spec.target_layer_ids, model=spec.model,
                  weights=spec.weights)
    return [ShardSpec(*bounds, **common)
            for bounds in shard_bounds((("chat", spec.chat), ("code", spec.code)), shard_size)]


def shard_conversations(shard: ShardSpec) -> list[list[dict]]:
    """[user, assistant] message pairs of one shard, to teacher-force."""
    if shard.domain == "chat":
        return chat_exchanges("train", shard.stop)[shard.start:shard.stop]
    # The same user turn the code prompts ask (tasks 0..119), answered with the task's canonical solution.
    code = [code_task_prompt(t["prompt"])
            + [{"role": "assistant", "content": f"```python\n{t['prompt']}{t['canonical_solution']}```"}]
            for t in humaneval_tasks()[:HUMANEVAL_TRAIN]]
    return code[shard.start:shard.stop]


def build_or_load_corpus(loaded: LoadedModel, spec: CorpusSpec, directory: Path,
                         shard_size: int = SHARD_SIZE) -> DataMix:
    return load_shards(corpus_shards(spec, shard_size), directory, "corpus",
                       lambda shard, path: build_or_load_shard(loaded, shard, path))


def build_or_load_shard(loaded: LoadedModel, shard: ShardSpec, directory: Path) -> DistillData | None:
    """The shard's data (cached after the first call); None when none of its conversations is usable."""
    spec_json, cached = load_cached(directory, shard)
    if cached is not None:
        return cached
    tok = loaded.tokenizer
    tokens, prompt_lens = [], []
    for messages in shard_conversations(shard):
        prompt = tok.encode_chat(messages[:1])
        full = tok.encode_chat(messages, add_generation_prompt=False)[:shard.max_tokens]
        # The reply must follow the prompt exactly as served, with room for a block of labels after it.
        if full[:len(prompt)] != prompt or len(full) - len(prompt) < 32:
            continue
        tokens.append(full)
        prompt_lens.append(len(prompt))
    if not tokens:
        return None
    feat_path = directory / "features.npy"
    labels = write_features(loaded, tokens, shard.target_layer_ids, feat_path, with_labels=True)
    saved = {"spec": spec_json, "prompt_lens": prompt_lens, "tokens": tokens, "domains": [shard.domain] * len(tokens),
             "labels": labels}
    return save_sequences(saved, directory)
