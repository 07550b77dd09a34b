"""Drafts looked up in a corpus of the target's own earlier text: a non-parametric drafter beside the trained one.

In-context lookup (engine/lookup_draft.py) finds what a sequence is about to repeat of itself. Much of what a model
writes it has also written before for other prompts: the scaffolding of a code answer, the phrasing of a worked
math step, the JSON of a tool call. A `LookupCorpus` holds token sequences the target wrote (prompt and greedy
answer, built offline by `ultraspeed build-lookup-corpus` from training prompts, never from the prompts we
measure on), and maps every n-gram (4 <= n <= 6) to what followed its latest occurrence. A sequence whose own
context has no match drafts from there. Lossless like every proposal fixed before the target runs.

Why not shorter matches: another prompt's text predicts this one less surely than its own context does. Drafting
from 2- and 3-token matches too replaced the trained drafter on 96% of math steps and lowered what they
committed (2.09 -> 1.98 tokens per step as served); from 4 tokens on, a corpus draft commits more than the
drafter's average in every domain (docs/drafter.md).

The index is a sorted array of 64-bit n-gram hashes (vectorized at build time, a binary search per lookup), a few
MB for a corpus of 100k+ tokens where a dict of tuples would take tens. A hash collision costs a wasted draft,
never a wrong token.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ultraspeed.errors import UltraSpeedError

_P = 0x100000001B3                # FNV-style multiplier: mixes each token into the running hash
_N_MIX = 0x9E3779B97F4A7C15       # keeps n-grams of different lengths apart
_MASK = (1 << 64) - 1


def ngram_hash(tokens: list[int]) -> int:
    """The hash `LookupCorpus` indexes an n-gram under (Python ints, the same arithmetic mod 2**64)."""
    h = 0
    for t in tokens:
        h = (h * _P + t + 1) & _MASK
    return h ^ ((len(tokens) * _N_MIX) & _MASK)


def _window_hashes(flat: np.ndarray, n: int) -> np.ndarray:
    """ngram_hash of flat[i:i+n] for every i, vectorized (uint64 arithmetic wraps mod 2**64)."""
    count = len(flat) - n + 1
    h = np.zeros(max(count, 0), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * np.uint64(_P) + flat[j:j + count].astype(np.uint64) + np.uint64(1)
    return h ^ np.uint64((n * _N_MIX) & _MASK)


@dataclass
class LookupCorpus:
    tokens: np.ndarray            # int64 [total]: the sequences, concatenated
    starts: np.ndarray            # int64 [num_sequences + 1]: where each begins (and the end)
    keys: np.ndarray              # uint64 [entries], sorted: n-gram hashes
    after: np.ndarray             # int64 [entries]: flat position following the n-gram's latest occurrence
    min_n: int = 4
    max_n: int = 6

    @classmethod
    def build(cls, sequences: list[list[int]], min_n: int = 4, max_n: int = 6) -> "LookupCorpus":
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.array([t for s in sequences for t in s], dtype=np.int64)
        return cls.index(flat, starts, min_n, max_n)

    @classmethod
    def index(cls, flat: np.ndarray, starts: np.ndarray, min_n: int, max_n: int) -> "LookupCorpus":
        """The corpus of the sequences flat[starts[i]:starts[i+1]] (int64 arrays), indexed."""
        keys, after = [], []
        for n in range(min_n, max_n + 1):
            h = _window_hashes(flat, n)
            follow = np.arange(n, n + len(h), dtype=np.int64)      # the position after each window
            # Keep windows inside one sequence whose successor is in the same sequence too.
            seq_of_end = np.searchsorted(starts, follow, side="right") - 1
            seq_of_start = np.searchsorted(starts, follow - n, side="right") - 1
            ok = (seq_of_end == seq_of_start) & (follow < starts[seq_of_start + 1])
            keys.append(h[ok])
            after.append(follow[ok])
        keys_all, after_all = np.concatenate(keys), np.concatenate(after)
        # Sort by hash, later occurrences after earlier ones; keep the last of each run of equal hashes.
        order = np.lexsort((after_all, keys_all))
        keys_all, after_all = keys_all[order], after_all[order]
        last = np.ones(len(keys_all), dtype=bool)
        last[:-1] = keys_all[1:] != keys_all[:-1]
        return cls(flat, starts, keys_all[last], after_all[last], min_n, max_n)

    @property
    def num_sequences(self) -> int:
        return len(self.starts) - 1

    def check_vocab(self, vocab_size: int) -> None:
        """A corpus written in another model's token ids would draft ids this model cannot embed: refuse it."""
        if len(self.tokens) and int(self.tokens.min()) < 0:
            raise UltraSpeedError("the lookup corpus holds negative token ids: it is corrupt")
        largest = int(self.tokens.max()) if len(self.tokens) else -1
        if largest >= vocab_size:
            raise UltraSpeedError(f"the lookup corpus holds token id {largest}, beyond this model's vocabulary of "
                                  f"{vocab_size}: it was built for another model (--lookup-corpus none skips it)")

    def propose(self, context: list[int], length: int) -> tuple[list[int], int]:
        """(up to `length` tokens that followed the longest n-gram ending `context`, n), or ([], 0)."""
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            h = np.uint64(ngram_hash(context[-n:]))
            i = int(np.searchsorted(self.keys, h))
            if i < len(self.keys) and self.keys[i] == h:
                pos = int(self.after[i])
                end = int(self.starts[np.searchsorted(self.starts, pos, side="right")])
                return self.tokens[pos:min(pos + length, end)].tolist(), n
        return [], 0

    def save(self, path: Path | str) -> None:
        np.savez_compressed(path, tokens=self.tokens.astype(np.uint32), starts=self.starts,
                            ngrams=np.array([self.min_n, self.max_n]))

    @classmethod
    def load(cls, path: Path | str, vocab_size: int | None = None) -> "LookupCorpus":
        """Rebuilds the index from the saved sequences (the file holds only the tokens: ~4 bytes each); with
        `vocab_size`, refuses a corpus of another model's token ids (check_vocab)."""
        try:   # allow_pickle stays off: a corpus is plain arrays, and a file must not run code when loaded
            with np.load(path) as f:
                tokens, starts, ngrams = f["tokens"], f["starts"], f["ngrams"]
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise UltraSpeedError(f"{path}: not a lookup corpus written by `ultraspeed build-lookup-corpus` "
                                  f"({type(e).__name__})") from None
        shapes_ok = (tokens.ndim == starts.ndim == ngrams.ndim == 1 and ngrams.shape == (2,)
                     and all(np.issubdtype(a.dtype, np.integer) for a in (tokens, starts, ngrams)))
        if not shapes_ok or not 1 <= ngrams[0] <= ngrams[1] <= 64:
            raise UltraSpeedError(f"{path}: corrupt lookup corpus (unexpected array shapes, types or n-gram sizes)")
        tokens, (min_n, max_n) = tokens.astype(np.int64), ngrams
        if len(starts) < 1 or starts[0] != 0 or starts[-1] != len(tokens) or np.any(np.diff(starts) < 0):
            raise UltraSpeedError(f"{path}: corrupt lookup corpus (sequence bounds do not match its tokens)")
        corpus = cls.index(tokens, starts.astype(np.int64), int(min_n), int(max_n))
        if vocab_size is not None:
            corpus.check_vocab(vocab_size)
        return corpus
