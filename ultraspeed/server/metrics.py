"""Prometheus text exposition, written by hand (no client library): counters, gauges and histograms per tier.

Updated from the event loop only (where responses are assembled), read there too when /metrics is scraped,
so no locking. Queue depth and running requests are read from the engine at scrape time.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ACCEPT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
RATE_WINDOW_S = 10.0


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f'{name}_bucket{{{labels},le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.total:.6g}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


@dataclass
class TierMetrics:
    requests: dict[str, int] = field(default_factory=dict)      # outcome -> count
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    acceptance: Histogram = field(default_factory=lambda: Histogram(ACCEPT_BUCKETS))
    recent: deque = field(default_factory=deque)                # (time, tokens) within RATE_WINDOW_S


class Metrics:
    def __init__(self, tiers: list[str], clock=time.monotonic) -> None:
        self.clock = clock
        self.tiers = {t: TierMetrics() for t in tiers}

    def tokens(self, tier: str, n: int, accepted: int) -> None:
        """n tokens arrived; `accepted` = tokens committed by the target forward that produced them (0: prefill)."""
        m = self.tiers[tier]
        m.recent.append((self.clock(), n))
        if accepted:
            m.acceptance.observe(accepted)

    def first_token(self, tier: str, seconds: float) -> None:
        self.tiers[tier].ttft.observe(seconds)

    def finished(self, tier: str, outcome: str, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        m = self.tiers[tier]
        m.requests[outcome] = m.requests.get(outcome, 0) + 1
        m.prompt_tokens += prompt_tokens
        m.completion_tokens += completion_tokens
        m.cost_usd += cost

    def rejected(self, tier: str, reason: str) -> None:
        m = self.tiers[tier]
        m.requests[reason] = m.requests.get(reason, 0) + 1

    def tokens_per_s(self, tier: str) -> float:
        m, now = self.tiers[tier], self.clock()
        while m.recent and m.recent[0][0] < now - RATE_WINDOW_S:
            m.recent.popleft()
        return sum(n for _, n in m.recent) / RATE_WINDOW_S

    def render(self, engine_snapshot: dict[str, dict[str, int]], queue_depth: int) -> str:
        def family(name: str, kind: str, help_: str, rows: list[str]) -> list[str]:
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *rows]

        out: list[str] = []
        t = self.tiers
        out += family("ultraspeed_requests_total", "counter", "API calls by tier and outcome",
                      [f'ultraspeed_requests_total{{tier="{k}",outcome="{o}"}} {n}'
                       for k, m in t.items() for o, n in sorted(m.requests.items())])
        out += family("ultraspeed_prompt_tokens_total", "counter", "prompt tokens billed",
                      [f'ultraspeed_prompt_tokens_total{{tier="{k}"}} {m.prompt_tokens}' for k, m in t.items()])
        out += family("ultraspeed_completion_tokens_total", "counter", "completion tokens billed",
                      [f'ultraspeed_completion_tokens_total{{tier="{k}"}} {m.completion_tokens}'
                       for k, m in t.items()])
        out += family("ultraspeed_cost_usd_total", "counter", "USD billed",
                      [f'ultraspeed_cost_usd_total{{tier="{k}"}} {m.cost_usd:.10g}' for k, m in t.items()])
        out += family("ultraspeed_tokens_per_second", "gauge", f"tokens streamed over the last {RATE_WINDOW_S:g} s",
                      [f'ultraspeed_tokens_per_second{{tier="{k}"}} {self.tokens_per_s(k):.4g}' for k in t])
        out += family("ultraspeed_queue_depth", "gauge", "requests waiting for a decoding slot",
                      [f'ultraspeed_queue_depth{{tier="{k}"}} {engine_snapshot.get(k, {}).get("waiting", 0)}'
                       for k in t] + [f'ultraspeed_queue_depth{{tier="all"}} {queue_depth}'])
        out += family("ultraspeed_running_requests", "gauge", "requests decoding now",
                      [f'ultraspeed_running_requests{{tier="{k}"}} {engine_snapshot.get(k, {}).get("running", 0)}'
                       for k in t])
        out += family("ultraspeed_time_to_first_token_seconds", "histogram",
                      "from arrival to the first generated token",
                      [line for k, m in t.items() for line in m.ttft.lines(
                          "ultraspeed_time_to_first_token_seconds", f'tier="{k}"')])
        out += family("ultraspeed_acceptance_length", "histogram",
                      "tokens committed per target forward (1 for plain decoding)",
                      [line for k, m in t.items() for line in m.acceptance.lines(
                          "ultraspeed_acceptance_length", f'tier="{k}"')])
        return "\n".join(out) + "\n"
