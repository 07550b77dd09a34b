"""Drafts copied from the sequence itself (prompt lookup): when the last few tokens occurred before, propose
what followed them then.

Code that restates a signature, JSON that repeats a tool call, an answer that quotes the question: much of what a
model writes is already in its context, and a trained drafter of two layers copies it less surely than an
n-gram match does. The verifier does not care where a draft comes from (any fixed proposal keeps decoding
lossless), so the engine can verify these instead of the drafter's block where they promise more
(engine/speculative.py). The index is updated as tokens are committed, so a lookup costs O(1) per step whatever
the context length. Where the context has no match, a corpus of the target's earlier answers may
(engine/lookup_corpus.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ultraspeed.engine.lookup_corpus import LookupCorpus

# Chance that slot i of a lookup draft is accepted once the slots before it were, by the length n of the
# recurring suffix it continues (4: four or more). Measured on the target's own responses to the drafter's
# training prompts (runs/distill-int8, all four domains, ~100k proposals; greedy, int8 target); later slots keep
# the last value. Adaptive verification (engine/verify_length.py) reads these as a drafter's confidences.
SLOT_ACCEPTANCE = {2: (0.55, 0.62, 0.69, 0.75, 0.79), 3: (0.61, 0.69, 0.75, 0.79, 0.80),
                   4: (0.83, 0.86, 0.88, 0.90, 0.91)}


# The same for drafts from a corpus of the target's earlier answers to other prompts (engine/lookup_corpus.py),
# by match length n (4 to 6: shorter matches from other prompts lose to the drafter). Measured on the int8
# target's greedy answers to 160 training prompts, drafting from the answers to the other 478 of the corpus
# (~1,200 proposals); smoothed where a slot had few samples.
CORPUS_SLOT_ACCEPTANCE = {4: (0.45, 0.5, 0.6, 0.63, 0.65), 5: (0.63, 0.63, 0.65, 0.8, 0.85),
                          6: (0.69, 0.73, 0.75, 0.81, 0.85)}


def lookup_confidence(n: int, slots: int, table: dict = SLOT_ACCEPTANCE) -> list[float]:
    """Estimated acceptance chances of a lookup draft's first `slots` tokens, for a suffix match of n tokens."""
    rates = table[min(max(n, min(table)), max(table))]
    return [rates[min(i, len(rates) - 1)] for i in range(slots)]


@dataclass
class NgramIndex:
    """Every n-gram (min_n <= n <= max_n) of a token sequence, mapped to the position just after its latest
    occurrence that has a successor; with a `corpus`, what to draft when the sequence's own context has no match."""
    min_n: int = 2
    max_n: int = 4
    tokens: list[int] = field(default_factory=list)
    after: dict[tuple[int, ...], int] = field(default_factory=dict)
    corpus: LookupCorpus | None = None
    # Drafts the trained drafter got accepted per step of this sequence (moving average; None before its first
    # step): a corpus draft promising fewer is left to the drafter.
    drafter_rate: float | None = None

    @classmethod
    def of(cls, tokens: list[int], corpus: LookupCorpus | None = None) -> "NgramIndex":
        index = cls(corpus=corpus)
        index.extend(tokens)
        return index

    def extend(self, new_tokens: list[int]) -> None:
        for token in new_tokens:
            end = len(self.tokens)          # the n-grams ending just before `token` now have a successor
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.after[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def propose(self, length: int) -> tuple[list[int], int]:
        """(up to `length` tokens that followed the longest recurring suffix, that suffix's length n), or ([], 0)
        when not even min_n trailing tokens occurred before."""
        for n in range(min(self.max_n, len(self.tokens)), self.min_n - 1, -1):
            start = self.after.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start:start + length], n
        return [], 0

    def draft(self, length: int, drafter: bool = True) -> tuple[list[int], list[float]]:
        """Up to `length` draft tokens and their estimated acceptance chances: the sequence's own continuation or
        the corpus's, whichever promises more accepted tokens (a match at the very end of the context may leave
        only a token or two to copy); none where neither has a match. With `drafter` (the trained drafter is
        there to run instead), a corpus draft must also promise more than the drafter has been getting accepted
        on this sequence: another prompt's text is a weaker guide than a good drafter."""
        tokens, n = self.propose(length)
        best = (tokens, lookup_confidence(n, len(tokens))) if tokens else ([], [])
        if self.corpus is not None:
            other, m = self.corpus.propose(self.tokens[-self.corpus.max_n:], length)
            if other:
                chances = lookup_confidence(m, len(other), CORPUS_SLOT_ACCEPTANCE)
                bar = max(expected_accepted(best[1]), (self.drafter_rate or 0.0) if drafter and not best[0] else 0)
                if expected_accepted(chances) > bar:
                    best = (other, chances)
        return best

    def record_step(self, committed: int, looked_up: bool, weight: float = 0.25) -> None:
        """A step of this sequence committed `committed` tokens (its accepted drafts and the bonus token), from a
        lookup draft or from the trained drafter's; the drafter's steps update drafter_rate."""
        if looked_up:
            return
        accepted, rate = committed - 1, self.drafter_rate
        self.drafter_rate = float(accepted) if rate is None else (1 - weight) * rate + weight * accepted


def expected_accepted(chances: list[float]) -> float:
    """Expected accepted drafts when each is accepted with its chance given the ones before it were: the
    verify-length rule's expected_tokens (less the bonus token) for one short list on the host, where building
    tensors would cost ~100x this loop (65 vs 0.7 us) on every step."""
    total, alive = 0.0, 1.0
    for c in chances:
        alive *= c
        total += alive
    return total
