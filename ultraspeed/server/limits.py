"""Access and fairness limits of the trial: API keys, requests in flight per key, connection time limits.

- API keys come from a file (one per line, `#` comments) and/or ULTRASPEED_API_KEYS (comma separated). With no
  keys configured the server is open and the per-key quota does not apply (a local server needs neither).
- A key may have `max_queued_per_key` API calls in flight (queued or running; a call with n candidates counts
  once); the next one gets 429 with Retry-After.
- A key's trial session lasts `session_seconds` from its first accepted call: calls after that get 429
  (`trial_session_expired`), and calls still running when it ends are cut (the stream ends with an error event).
  Any one call lasts at most `request_seconds` (keys or not), and a streaming connection that received no token for
  `idle_seconds` (stuck in the queue, or a stalled engine) is closed the same way. Zero disables a limit.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ultraspeed.errors import UltraSpeedError

API_KEYS_ENV = "ULTRASPEED_API_KEYS"


@dataclass(frozen=True)
class LimitsConfig:
    api_keys: frozenset[str] = frozenset()   # empty: no authentication
    max_queued_per_key: int = 10
    session_seconds: float = 30 * 60         # per API key, from its first call
    request_seconds: float = 30 * 60         # per call
    idle_seconds: float = 5 * 60
    retry_after_seconds: int = 2             # what a 429/503 tells the client to wait

    @property
    def auth_required(self) -> bool:
        return bool(self.api_keys)


def load_api_keys(path: str | Path | None = None, environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    keys = {k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip()}
    if path is not None:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise UltraSpeedError(f"cannot read API keys file {path}: {e.strerror}") from e
        keys |= {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    return frozenset(keys)


def bearer_token(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class KeyQuota:
    """API calls in flight per key. Used from the event loop only, so no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight: Counter[str] = Counter()

    def try_acquire(self, key: str | None) -> bool:
        if key is None:            # open server: no per-key quota
            return True
        if self._in_flight[key] >= self.limit:
            return False
        self._in_flight[key] += 1
        return True

    def release(self, key: str | None) -> None:
        if key is not None:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]

    def in_flight(self, key: str) -> int:
        return self._in_flight[key]


class TrialSessions:
    """When each API key's trial session ends: `session_seconds` after its first accepted call (a call refused
    for bad input, quota or load does not start it). Event loop only, no lock. Sessions live as long as the
    server (a restart starts every key afresh)."""

    def __init__(self, session_seconds: float) -> None:
        self.session_seconds = session_seconds
        self._ends: dict[str, float] = {}

    def end(self, key: str | None) -> float:
        """The key's session end (perf_counter time); inf before its first accepted call, for an open server
        (no key) or with no limit."""
        return math.inf if key is None else self._ends.get(key, math.inf)

    def start(self, key: str | None, now: float) -> float:
        """Start the key's session at its first accepted call (later calls keep the first end); its end."""
        if key is None or self.session_seconds <= 0:
            return math.inf
        return self._ends.setdefault(key, now + self.session_seconds)
