"""Real text per domain for QAT (train split) and for perplexity (held-out split), on the same split as the
prompt sets in train/prompts.py, so nothing evaluated was trained on:

- chat: ShareGPT first user turns (every 10th usable conversation is held out);
- code: HumanEval prompt + canonical solution (tasks 0..119 train, 120..163 held out).
"""

from __future__ import annotations

from ultraspeed.train.prompts import chat_prompts, humaneval_tasks

CORPUS_DOMAINS = ("chat", "code")


def corpus_texts(split: str, chat_count: int, code_count: int = 164) -> dict[str, list[str]]:
    tasks = humaneval_tasks()
    code_tasks = tasks[:120] if split == "train" else tasks[120:]
    return {
        "chat": [messages[0]["content"] for messages in chat_prompts(split, chat_count)],
        "code": [t["prompt"] + t["canonical_solution"] for t in code_tasks[:code_count]],
    }


def token_windows(token_lists: list[list[int]], length: int, separator: int | None) -> list[list[int]]:
    """Concatenate tokenized texts (separated by `separator`, e.g. EOS) and cut the stream into windows of
    `length` tokens: packing wastes no compute on padding. A short tail is dropped."""
    stream: list[int] = []
    for ids in token_lists:
        stream += ids + ([separator] if separator is not None else [])
    return [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]
