"""The economics of a faster, pricier tier: effective cost and time per *completed* task.

For a task of N output tokens (plus P prompt tokens) on a tier with decode speed s tok/s, time to first token
f, price multiplier m over base prices (USD per million input/output tokens), a probability r that an attempt
times out and is retried, and a value v (USD per hour) on the time a person or pipeline waits:

    time per attempt        t = f + N / s
    attempts per success    A = 1 / (1 - r)                (geometric: retry until one finishes)
    money per success       C = A * m * (P * price_in + N * price_out) / 1e6
                            (a timed-out attempt is billed like a finished one: conservative)
    time per success        T = A * t
    effective cost          E = C + v * T / 3600

Break-even: the value of time at which two tiers cost the same, v* = 3600 (C_fast - C_slow) / (T_slow - T_fast);
above v* the faster tier is cheaper per completed task.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ultraspeed.errors import UltraSpeedError


@dataclass(frozen=True)
class Tier:
    name: str
    tokens_per_s: float
    price_multiplier: float = 1.0
    ttft_s: float = 0.5
    timeout_retry_rate: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.tokens_per_s < math.inf:
            raise UltraSpeedError(f"tier {self.name}: tokens_per_s must be a finite number > 0")
        if not (0 < self.price_multiplier < math.inf and 0 <= self.ttft_s < math.inf):
            raise UltraSpeedError(f"tier {self.name}: the price multiplier must be > 0 and ttft_s >= 0 (finite)")
        if not 0 <= self.timeout_retry_rate < 1:
            raise UltraSpeedError(f"tier {self.name}: timeout_retry_rate must be in [0, 1)")


@dataclass(frozen=True)
class Task:
    output_tokens: int
    prompt_tokens: int = 0
    price_in_per_m: float = 0.5       # USD per million input tokens at 1x
    price_out_per_m: float = 2.0      # USD per million output tokens at 1x
    value_of_time_per_h: float = 0.0  # USD per hour of waiting

    def __post_init__(self) -> None:
        prices = (self.price_in_per_m, self.price_out_per_m, self.value_of_time_per_h)
        if self.output_tokens < 1 or self.prompt_tokens < 0 or not all(0 <= p < math.inf for p in prices):
            raise UltraSpeedError("a task needs output_tokens >= 1, prompt_tokens >= 0 and finite prices >= 0")


def tier_economics(tier: Tier, task: Task) -> dict:
    attempts = 1.0 / (1.0 - tier.timeout_retry_rate)
    seconds_per_attempt = tier.ttft_s + task.output_tokens / tier.tokens_per_s
    money = attempts * tier.price_multiplier * (task.prompt_tokens * task.price_in_per_m
                                                + task.output_tokens * task.price_out_per_m) / 1e6
    seconds = attempts * seconds_per_attempt
    return {"tier": tier.name, "attempts_per_success": attempts, "seconds_per_task": seconds,
            "money_per_task": money, "effective_cost_per_task": money + task.value_of_time_per_h * seconds / 3600}


def break_even_value_of_time(fast: dict, slow: dict) -> float | None:
    """USD/hour of waiting above which `fast` is cheaper per completed task (None: it never is / always is)."""
    saved = slow["seconds_per_task"] - fast["seconds_per_task"]
    extra = fast["money_per_task"] - slow["money_per_task"]
    if saved <= 0:
        return None
    return max(0.0, 3600 * extra / saved)


def compare(tiers: list[Tier], task: Task) -> dict:
    rows = [tier_economics(t, task) for t in tiers]
    report = {"task": asdict(task), "tiers": rows}
    if len(rows) >= 2:
        slow, fast = sorted(rows[:2], key=lambda r: -r["seconds_per_task"])
        report["break_even_value_of_time_per_h"] = break_even_value_of_time(fast, slow)
        report["cheaper_at_given_value_of_time"] = min(rows, key=lambda r: r["effective_cost_per_task"])["tier"]
    return report


def speeds_from_bench(path: Path) -> dict[str, float]:
    """Standard / ultraspeed tok/s found in a `bench speed` or `bench acceptance` JSON report (either may be
    missing: explicit flags fill the gaps). From an acceptance report: plain decoding, and DFlash as `generate`
    and `serve` run it (the `served` configuration), at the block size fastest over all domains."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UltraSpeedError(f"{path}: cannot read a bench JSON report ({e})") from None
    try:
        speeds = _report_speeds(report)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UltraSpeedError(f"{path}: not a bench speed/acceptance report ({type(e).__name__}: {e})") from None
    return {tier: speed for tier, speed in speeds.items() if speed is not None}


def _report_speeds(report: dict) -> dict[str, float | None]:
    if report.get("bench") == "speed":
        systems = report["systems"]
        fast = systems.get("ultraspeed_dflash") or systems.get("ultraspeed_mxfp4_dflash") or {}
        return {"standard": _speed(systems.get("ultraspeed_plain", {}).get("tokens_per_s")),
                "ultraspeed": _speed(fast.get("tokens_per_s"))}
    if report.get("bench") == "acceptance":
        results = list(report["results"].values())
        if not results:
            raise ValueError("no results")

        def served(r: dict, block: str) -> float:
            b = r["blocks"][block]
            return _speed((b.get("served") or b)["tokens_per_s"])     # reports before "served" timed only one

        best = max(results[0]["blocks"], key=lambda block: sum(served(r, block) for r in results))
        return {"standard": _speed(sum(_speed(r["plain_tokens_per_s"]) for r in results) / len(results)),
                "ultraspeed": sum(served(r, best) for r in results) / len(results)}
    raise ValueError(f"bench {report.get('bench')!r}")


def _speed(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"a speed of {value!r} tok/s")
    return float(value)


def format_report(report: dict) -> str:
    lines = ["| tier | s/task | attempts | $ / task | effective $ / task |", "|---|---|---|---|---|"]
    for r in report["tiers"]:
        lines.append(f"| {r['tier']} | {r['seconds_per_task']:.2f} | {r['attempts_per_success']:.3f} | "
                     f"{r['money_per_task']:.6f} | {r['effective_cost_per_task']:.6f} |")
    be = report.get("break_even_value_of_time_per_h")
    if "break_even_value_of_time_per_h" in report:
        lines.append("")
        lines.append("break-even value of waiting time: " + (f"${be:.2f}/hour" if be is not None else
                                                              "none (the faster tier saves no time)"))
        lines.append(f"cheaper per completed task at the given value of time: {report['cheaper_at_given_value_of_time']}")
    return "\n".join(lines)
