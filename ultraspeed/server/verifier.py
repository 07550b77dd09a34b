"""Best-of-N verification: run every candidate against the request's Python tests and pick the best one.

Each candidate runs in its own `python -I` subprocess, in an empty temporary directory, with a wall-clock time
limit and (on POSIX) CPU-time and address-space limits. The harness executes the candidate's code (the fenced
code blocks of its text when there are any, else the whole text), then the tests: every top-level `assert` is one
test, counted separately; other statements (imports, helpers) are setup. Best = most tests passed; ties go to the
earliest candidate.

This is isolation against accidents (loops, crashes, memory blow-ups), NOT a security sandbox: tests and generated
code run with the server user's rights. The server therefore enables verifiers only with --enable-verifier.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ultraspeed.errors import UltraSpeedError


@dataclass(frozen=True)
class VerifierConfig:
    enabled: bool = False           # runs user-supplied code: opt-in
    timeout_s: float = 5.0          # per candidate (a request may ask for less)
    memory_mb: int = 1024           # address-space limit per candidate
    parallel: int = 2               # candidates checked at once


@dataclass
class Verdict:
    index: int
    passed: int = 0
    total: int = 0
    error: str | None = None        # why the code did not load or ran out of time
    failures: list[str] | None = None
    seconds: float = 0.0

    @property
    def all_passed(self) -> bool:
        return self.error is None and self.passed == self.total

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BestOf:
    winner: int                     # index among the candidates of one prompt
    reason: str
    verdicts: list[Verdict]


_HARNESS = r'''
import ast, json, sys
code_path, tests_path, result_path, cpu_s, memory_mb = sys.argv[1:6]
try:   # limits set here rather than in a preexec_fn, which is unsafe in a threaded server
    import resource
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_s), int(cpu_s)))
    resource.setrlimit(resource.RLIMIT_AS, (int(memory_mb) << 20, int(memory_mb) << 20))
except (ImportError, ValueError, OSError):
    pass
result = {"passed": 0, "total": 0, "error": None, "failures": [], "finished": False}
tests = ast.parse(open(tests_path).read())
result["total"] = sum(isinstance(s, ast.Assert) for s in tests.body)
def save():
    with open(result_path, "w") as f:
        json.dump(result, f)
save()
ns = {"__name__": "__main__"}
try:
    exec(compile(open(code_path).read(), "candidate.py", "exec"), ns)
except BaseException as e:
    result["error"] = f"candidate code failed: {type(e).__name__}: {e}"[:300]
    result["finished"] = True
    save()
    sys.exit(0)
for stmt in tests.body:
    try:
        exec(compile(ast.Module([stmt], []), "tests.py", "exec"), ns)
        result["passed"] += isinstance(stmt, ast.Assert)
    except BaseException as e:
        line = ast.unparse(stmt)[:120]
        if isinstance(stmt, ast.Assert):
            result["failures"].append(f"{line}: {type(e).__name__}: {e}"[:300])
        else:
            result["error"] = f"test setup `{line}` failed: {type(e).__name__}: {e}"[:300]
            break
    save()
result["finished"] = True
save()
'''

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The fenced code blocks of a completion (joined), or the whole text when it has none."""
    blocks = _FENCE.findall(text)
    return "\n\n".join(blocks) if blocks else text


def check_tests(tests: str) -> None:
    """Reject tests that do not parse before any tokens are spent on them."""
    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise UltraSpeedError(f"verifier tests do not parse: {e.msg} (line {e.lineno})") from e
    if not any(isinstance(s, ast.Assert) for s in tree.body):
        raise UltraSpeedError("verifier tests need at least one top-level assert statement")


async def run_candidate(index: int, text: str, tests: str, timeout_s: float, config: VerifierConfig) -> Verdict:
    t0 = time.perf_counter()
    verdict = Verdict(index)
    with tempfile.TemporaryDirectory(prefix="ultraspeed-verify-") as tmp:
        d = Path(tmp)
        (d / "harness.py").write_text(_HARNESS)
        (d / "candidate.py").write_text(extract_code(text))
        (d / "tests.py").write_text(tests)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", str(d / "harness.py"), str(d / "candidate.py"), str(d / "tests.py"),
            str(d / "result.json"), str(int(timeout_s) + 1), str(config.memory_mb), cwd=tmp,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            env={})
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            verdict.error = f"timed out after {timeout_s:g} s"
        result_path = d / "result.json"
        if result_path.exists():
            try:
                r = json.loads(result_path.read_text())
                verdict.passed, verdict.total, verdict.failures = r["passed"], r["total"], r["failures"]
                verdict.error = verdict.error or r["error"] or (
                    None if r["finished"] else f"the test process exited early (status {proc.returncode})")
            except (ValueError, KeyError):
                verdict.error = verdict.error or "the test harness crashed"
        elif verdict.error is None:
            verdict.error = f"the test process died (exit status {proc.returncode})"
    verdict.seconds = round(time.perf_counter() - t0, 3)
    return verdict


async def pick_best(texts: list[str], tests: str, config: VerifierConfig, timeout_s: float | None = None) -> BestOf:
    timeout = min(timeout_s or config.timeout_s, config.timeout_s)
    gate = asyncio.Semaphore(config.parallel)

    async def one(i: int, text: str) -> Verdict:
        async with gate:
            return await run_candidate(i, text, tests, timeout, config)

    verdicts = list(await asyncio.gather(*(one(i, t) for i, t in enumerate(texts))))
    best = max(verdicts, key=lambda v: (v.passed, -v.index))
    return BestOf(best.index, _reason(best, verdicts), verdicts)


def _reason(best: Verdict, verdicts: list[Verdict]) -> str:
    others = [v for v in verdicts if v is not best]
    if best.all_passed:
        head = f"candidate {best.index} passed all {best.total} tests"
    elif best.passed:
        head = f"no candidate passed every test; candidate {best.index} passed the most ({best.passed}/{best.total})"
    else:
        head = f"no candidate passed any test; returning candidate {best.index}"
    if not others:
        return head
    summary = ", ".join(f"{v.index}: {v.passed}/{v.total}" + (f" ({v.error})" if v.error else "") for v in others)
    return f"{head}; others: {summary}"
