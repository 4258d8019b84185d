"""Exact and near duplicate texts (the rules: tasks/calibration/request_log.py's docstring, **exact duplicate** and
**near duplicate**): an exact key, and a MinHash-LSH index of word-3-shingles checked exactly by Jaccard similarity."""

from __future__ import annotations

import re
import zlib

import numpy as np

SHINGLE = 3
MINHASH_PERMUTATIONS, MINHASH_BANDS = 64, 16


def dedupe_key(text: str) -> str:
    """Exact-duplicate key: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


_DIGIT_RUNS = re.compile(r"\d+")


def near_key(text: str) -> str:
    return _DIGIT_RUNS.sub("0", " ".join(text.split()).casefold())


def shingles(text: str) -> frozenset[int]:
    words = near_key(text).split()
    if len(words) <= SHINGLE:
        return frozenset({zlib.crc32(" ".join(words).encode())})
    return frozenset(zlib.crc32(" ".join(words[i:i + SHINGLE]).encode()) for i in range(len(words) - SHINGLE + 1))


_P = np.uint64(4_294_967_311)  # a prime above 2**32: (a*h + b) stays below 2**64 for a, b < P and 32-bit h
_rng = np.random.default_rng(0x5EED)
_A = _rng.integers(1, int(_P), MINHASH_PERMUTATIONS, dtype=np.uint64)[:, None]
_B = _rng.integers(0, int(_P), MINHASH_PERMUTATIONS, dtype=np.uint64)[:, None]


def minhash(sh: frozenset[int]) -> np.ndarray:
    h = np.fromiter(sh, dtype=np.uint64, count=len(sh))[None, :]
    return ((_A * h + _B) % _P).min(axis=1)


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicateIndex:
    """Accepted texts, indexed by MinHash bands; ``seen`` says whether a new one is a near duplicate of one of them."""

    def __init__(self, threshold: float | None):
        self.threshold = threshold
        self._bands: dict[tuple, list[int]] = {}
        self._sets: list[frozenset[int]] = []
        self.examined = self.removed = 0

    def seen(self, content: str, system: str = "") -> bool:
        """True (and nothing added) when ``content`` is a near duplicate of an accepted text; else accept it."""
        self.examined += 1
        dup = self._seen(content, system)
        self.removed += dup
        return dup

    def _seen(self, content: str, system: str) -> bool:
        if self.threshold is None:
            return False
        sh = shingles(content)
        sig = minhash(sh)
        sys_key = zlib.crc32(dedupe_key(system).encode())
        rows = MINHASH_PERMUTATIONS // MINHASH_BANDS
        keys = [(sys_key, b, sig[b * rows:(b + 1) * rows].tobytes()) for b in range(MINHASH_BANDS)]
        candidates = {i for k in keys for i in self._bands.get(k, ())}
        if any(jaccard(sh, self._sets[i]) >= self.threshold for i in candidates):
            return True
        idx = len(self._sets)
        self._sets.append(sh)
        for k in keys:
            self._bands.setdefault(k, []).append(idx)
        return False
