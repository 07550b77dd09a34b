"""Incremental detokenization with stop strings, shared by the CLI and the server.

Tokens arrive a few at a time; text is emitted only once it is final: not ending in a partial UTF-8 character
and not possibly the beginning of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ultraspeed.tokenizer import Tokenizer


@dataclass
class TextStream:
    tokenizer: Tokenizer
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    emitted: int = 0            # characters of the full text already handed out
    stopped: bool = False       # a stop string was found: nothing more will be emitted
    stop_tokens: int | None = None   # then: the tokens up to the one that completed it (the rest is surplus)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def feed(self, new_ids: list[int]) -> str:
        """Add tokens; return the newly final text."""
        if self.stopped:
            return ""
        before = len(self.ids)
        self.ids.extend(new_ids)
        full = self.text()
        at = self._find_stop(full)
        if at is not None:
            self.stopped = True
            # A speculative step commits several tokens at once: count only those a one-token-at-a-time decode
            # would have produced before it saw the stop string.
            self.stop_tokens = next(m for m in range(before + 1, len(self.ids) + 1)
                                    if m == len(self.ids)
                                    or self._find_stop(self.tokenizer.decode(self.ids[:m])) is not None)
            return self._emit(full[:at])
        safe = len(full)
        if full.endswith("\ufffd"):
            safe = len(full.rstrip("\ufffd"))
        for s in self.stop:   # hold back a tail that could still grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if full[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._emit(full[:safe])

    def _find_stop(self, full: str) -> int | None:
        """Where the earliest stop string starts in `full` (searching only text not yet emitted), if any."""
        found = [at for s in self.stop if (at := full.find(s, max(0, self.emitted - len(s)))) != -1]
        return min(found, default=None)

    def flush(self) -> str:
        """At the end of generation everything not yet emitted is final (unless a stop string cut it)."""
        return "" if self.stopped else self._emit(self.text())

    def _emit(self, final_text: str) -> str:
        delta = final_text[self.emitted:]
        self.emitted = max(self.emitted, len(final_text))
        return delta
