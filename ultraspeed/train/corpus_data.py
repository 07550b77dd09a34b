"""Teacher-forced drafter data from existing text: ShareGPT first exchanges and HumanEval solutions (training
splits only), run through the target once, never generated.

Self-distillation (train/distill_data.py) makes the target write every token, which on a 2-core CPU yields a few
tens of thousands of tokens an hour. A teacher-forced forward over text that already exists is ~10x cheaper per
token, so the drafter can see many more contexts (EAGLE's recipe). The text is not the target's, but the labels
are: at every position the label is the target's own greedy prediction there, so the drafter still learns to
predict the target, which is all verification rewards. Same files and loader as distill_data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ultraspeed.loader import LoadedModel
from ultraspeed.train.distill_data import DistillData, load_cached, load_saved, write_features
from ultraspeed.train.prompts import chat_exchanges, code_prompts, humaneval_tasks


@dataclass(frozen=True)
class CorpusSpec:
    chat: int = 1000                 # ShareGPT first exchanges (training split)
    code: int = 120                  # HumanEval training tasks, answered with their canonical solution
    max_tokens: int = 512            # sequences are cut here (bounds the forward and the features on disk)
    target_layer_ids: tuple[int, ...] = ()
    model: str = "default"
    weights: str = "checkpoint"


def corpus_conversations(spec: CorpusSpec) -> list[tuple[str, list[dict]]]:
    """(domain, [user, assistant]) pairs to teacher-force."""
    # The same user turn the code prompts ask (tasks 0..119), answered with the task's canonical solution.
    code = [prompt + [{"role": "assistant", "content": f"```python\n{t['prompt']}{t['canonical_solution']}```"}]
            for prompt, t in zip(code_prompts("train")[:spec.code], humaneval_tasks())]
    return [("chat", m) for m in chat_exchanges("train", spec.chat)] + [("code", m) for m in code]


def build_or_load_corpus(loaded: LoadedModel, spec: CorpusSpec, directory: Path) -> DistillData:
    spec_json, cached = load_cached(directory, spec)
    if cached is not None:
        return cached
    seq_path, feat_path = directory / "sequences.pt", directory / "features.npy"
    tok = loaded.tokenizer
    tokens, prompt_lens, domains = [], [], []
    for domain, messages in corpus_conversations(spec):
        prompt = tok.encode_chat(messages[:1])
        full = tok.encode_chat(messages, add_generation_prompt=False)[:spec.max_tokens]
        # The reply must follow the prompt exactly as served, with room for a block of labels after it.
        if full[:len(prompt)] != prompt or len(full) - len(prompt) < 32:
            continue
        tokens.append(full)
        prompt_lens.append(len(prompt))
        domains.append(domain)
    labels = write_features(loaded, tokens, spec.target_layer_ids, feat_path, with_labels=True)
    saved = {"spec": spec_json, "prompt_lens": prompt_lens, "tokens": tokens, "domains": domains, "labels": labels}
    torch.save(saved, seq_path)
    return load_saved(saved, feat_path)
