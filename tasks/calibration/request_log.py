"""Production request logs as a calibration source: a seeded, stratified, deduplicating sampler that holds a
bounded number of texts however long the log is. Its reader and chat rendering are tasks/calibration/request_reader.py,
redaction tasks/calibration/redaction.py, the duplicate keys and index tasks/calibration/duplicates.py; the rules they
follow are all written here.

A log is JSON Lines of OpenAI-style requests: ``{"prompt": "..."}`` (completions; a list of strings is several
prompts) or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat; content may be a string or a list of
``{"type": "text", "text": ...}`` parts), with optional metadata (tenant, task, timestamp, ...) at the top level or
under ``"metadata"``. Chat requests are rendered with the model's chat template exactly as an OpenAI-compatible
server renders them: ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`` (plus
``tools=`` when the request has tools).

The rules, in the order they apply:

* **read**: one line at a time (a line over ``request_reader.MAX_LINE_BYTES`` is skipped in chunks, never held:
  ``over_long``); a line that is not a JSON object is ``malformed``; an object with neither ``prompt`` nor ``messages``
  is ``unsupported``; a chat request the template refuses is ``template_error``.
* **redact** (``redact: true``): e-mail addresses, bearer tokens, JWTs, API-key-shaped tokens (``sk-``, ``ghp_``,
  ``github_pat_``, ``xox?-``, ``AKIA``, ``AIza``, ``hf_``, ``glpat-``), ``password=``/``api_key:``-style assignments,
  PEM private keys, Luhn-valid card numbers and SSN-shaped numbers are replaced by a ``[KIND]`` placeholder in every
  text that is kept (the sample, the held-out sample, the reference texts before they are counted) and in stratum
  values from metadata, before anything is stored. The stream itself is hashed and measured as logged (redacting a
  million requests would dominate the pass); two kept requests that become equal once redacted count as one, and
  none equals a held-out one.
* **usable**: the request's own text (prompt, or its messages' text) is non-empty and at least ``min_chars`` long
  (else ``empty``); the rendered prompt has at most ``max_record_tokens`` tokens (else ``over_long``).
* **exact duplicate**: the same rendered prompt after whitespace collapsing and case folding (the *key*).
  The log's duplicate rate is estimated from a 16,384-value bottom-k sketch of the keys' hashes (~0.8% error).
* **held out**: ``calibrate.is_holdout(key, seed, holdout_fraction)``: hash-based, so independent of log order and
  sample size; a held-out text is never sampled for calibration.
* **strata**: the token-length bucket of the rendered prompt by default, or metadata fields, or both (one key);
  at most ``max_strata`` distinct keys, later new keys fall into ``(other)``. Each stratum gets samples in proportion
  to its share of usable records (largest remainder); a stratum with too few distinct texts gives its remainder to
  the others, in proportion.
* **sampling**: per stratum, the ``2 × samples`` distinct texts with the smallest seeded hash priority are kept
  while streaming (a bottom-k sample: uniform over distinct texts, independent of log order; exact duplicates land
  on the same slot, so they are counted, never drawn twice).
* **near duplicate**: two requests with the same system prompt(s) whose remaining text, case-folded with whitespace
  collapsed and digit runs replaced by ``0``, has a word-3-shingle Jaccard similarity >= ``near_duplicate_threshold``.
  Candidates are found with 64-permutation MinHash LSH (16 bands × 4 rows) and checked exactly; the copy with the
  lower priority is kept. Applied to the drawn candidates and to the held-out sample (not to the whole log).
* **token lengths**: ``exact`` tokenizes every usable record with the model's tokenizer; ``estimate`` (default)
  tokenizes the first 2,000 usable records, takes their characters-per-token ratio, and estimates every record's
  length as ``chars / ratio`` for bucketing and the ``over_long`` rule. Either way the calibration sample, the
  reference sample and the first-N slice are then tokenized exactly for the stored lengths and the report.
* Alongside, for the representativeness report: a uniform reservoir sample of ``reference_samples`` usable records
  (traffic-weighted: duplicates count) and the first ``samples`` usable records (what a naive first-N slice would
  have been).

Memory: at most ``max_strata × 2 × samples + holdout_samples + reference_samples + samples`` texts plus one batch
of 2,000, whatever the log's length.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from tasks.calibration.duplicates import NearDuplicateIndex, dedupe_key
from tasks.calibration.redaction import redact
from tasks.calibration.request_reader import Request, iter_requests

DEFAULT_LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
WARMUP_RECORDS = 2_000  # estimate mode: records tokenized to measure characters per token
BATCH = 2_000
OVERSAMPLE = 2  # candidates kept per stratum, as a multiple of the sample size
SKETCH_SIZE = 16_384  # bottom-k sketch for the distinct-text estimate (relative error ~0.8%)
OTHER = "(other)"

TokenCounter = Callable[[list[str]], list[int]]


# ---------------------------------------------------------------------------------------------------------- keys

def hash_key(key: str, seed: int) -> tuple[float, int]:
    """(holdout value in [0, 1), sampling priority): the first is exactly what ``calibrate.is_holdout`` compares."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:16], "big")


def length_bucket_names(edges: tuple[int, ...]) -> list[str]:
    bounds = [0, *edges]
    return [f"{lo}-{hi - 1}" for lo, hi in zip(bounds, bounds[1:])] + [f"{edges[-1]}+"]


def length_bucket(n_tokens: int, edges: tuple[int, ...], names: list[str] | None = None) -> str:
    names = names or length_bucket_names(edges)
    return names[bisect.bisect_right(edges, n_tokens)]


# ---------------------------------------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class SamplingOptions:
    samples: int = 512
    seed: int = 1234
    holdout_fraction: float = 0.2
    stratify_by: tuple[str, ...] = ("length",)
    length_buckets: tuple[int, ...] = DEFAULT_LENGTH_BUCKETS
    token_lengths: str = "estimate"  # estimate | exact
    near_duplicate_threshold: float | None = 0.8
    redact: bool = True
    min_chars: int = 0
    max_record_tokens: int = 32_768
    reference_samples: int = 10_000
    holdout_samples: int = 1_024
    max_strata: int = 64

    @classmethod
    def from_spec(cls, spec) -> "SamplingOptions":
        """From a ``CalibrationSpec`` whose source is request_log."""
        rl = spec.request_log_options()
        return cls(samples=spec.samples, seed=spec.seed, holdout_fraction=spec.holdout_fraction,
                   stratify_by=tuple(rl.stratify_by), length_buckets=tuple(rl.length_buckets),
                   token_lengths=rl.token_lengths, near_duplicate_threshold=rl.near_duplicate_threshold,
                   redact=rl.redact, min_chars=spec.min_chars, max_record_tokens=rl.max_record_tokens,
                   reference_samples=rl.reference_samples, holdout_samples=rl.holdout_samples,
                   max_strata=rl.max_strata)

    @property
    def metadata_fields(self) -> tuple[str, ...]:
        return tuple(f for f in self.stratify_by if f != "length")


@dataclass(frozen=True)
class SampleResult:
    """What the sampler kept, redacted. Token counts are exact (the model's tokenizer)."""
    texts: tuple[str, ...]
    strata: tuple[str, ...]
    n_tokens: tuple[int, ...]
    occurrences: tuple[int, ...]  # how often each sampled request occurred in the log (exact)
    holdout: tuple[str, ...]
    reference_strata: tuple[str, ...]
    reference_tokens: tuple[int, ...]
    first_n_strata: tuple[str, ...]
    first_n_tokens: tuple[int, ...]
    source_strata: dict  # stratum -> usable records in the whole log
    counts: dict  # records, usable, dropped by reason, duplicates, ...
    redactions: dict  # kind -> stored texts (sample and holdout) in which it was replaced


class _Entry:
    __slots__ = ("priority", "text", "content", "system", "stratum", "occurrences")

    def __init__(self, priority, text, content, system, stratum):
        self.priority, self.text, self.content, self.system, self.stratum = priority, text, content, system, stratum
        self.occurrences = 1


class _BottomK:
    """The k distinct items with the smallest priority seen so far; a repeat of a kept item is counted on it."""

    def __init__(self, k: int):
        self.k = k
        self._heap: list[tuple[int, int]] = []  # (-priority, priority): a max-heap on priority
        self.items: dict[int, _Entry] = {}
        self.repeats = 0

    def would_keep(self, priority: int) -> bool:
        return len(self._heap) < self.k or priority <= -self._heap[0][0]

    def offer(self, priority: int, make: Callable[[], _Entry]) -> None:
        kept = self.items.get(priority)
        if kept is not None:
            kept.occurrences += 1
            self.repeats += 1
            return
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, (-priority, priority))
        elif priority < -self._heap[0][0]:
            _, evicted = heapq.heapreplace(self._heap, (-priority, priority))
            del self.items[evicted]
        else:
            return
        self.items[priority] = make()

    def sorted(self) -> list[_Entry]:
        return [self.items[p] for p in sorted(self.items)]


def allocate(counts: dict[str, int], total: int, caps: dict[str, int]) -> dict[str, int]:
    """Apportion ``total`` to strata in proportion to ``counts`` (largest remainder), none above its cap; what a
    capped stratum cannot take goes to the others in proportion."""
    alloc: dict[str, int] = {}
    active = {k for k, c in counts.items() if c > 0 and caps.get(k, 0) > 0}
    left = min(total, sum(caps.get(k, 0) for k in active))
    while active and left > 0:
        weight = sum(counts[k] for k in active)
        capped = {k for k in active if caps[k] <= left * counts[k] / weight}
        if not capped:
            break
        for k in capped:
            alloc[k] = caps[k]
            left -= caps[k]
        active -= capped
    if active and left > 0:
        weight = sum(counts[k] for k in active)
        quotas = {k: left * counts[k] / weight for k in active}
        floors = {k: int(q) for k, q in quotas.items()}
        for k in sorted(active, key=lambda k: (floors[k] - quotas[k], k))[:left - sum(floors.values())]:
            floors[k] += 1
        alloc.update(floors)
    return {k: alloc.get(k, 0) for k in counts}


class Sampler:
    """Feed requests with :meth:`add` (or :meth:`consume`), then :meth:`finish`. Holds a bounded number of texts."""

    def __init__(self, options: SamplingOptions, count_tokens: TokenCounter):
        self.o = options
        self.count_tokens = count_tokens
        self._names = length_bucket_names(options.length_buckets)
        self._rng = random.Random(options.seed)
        self._buffer: list[Request] = []
        self._chars_per_token: float | None = None
        self._pool: dict[str, _BottomK] = {}
        self._holdout = _BottomK(options.holdout_samples)
        self._reference: list[tuple[str, str]] = []
        self._first_n: list[tuple[str, str]] = []
        self._sketch: list[int] = []  # max-heap (negated) of the smallest distinct priorities
        self._sketch_members: set[int] = set()
        self.source_strata: Counter = Counter()
        self.counts: Counter = Counter()

    # -- streaming
    def consume(self, requests: Iterable[Request]) -> "Sampler":
        for request in requests:
            self.add(request)
        return self

    def add(self, request: Request) -> None:
        self.counts["records"] += 1
        if request.problem:
            self.counts[request.problem] += 1
            return
        if len(request.content.strip()) < max(1, self.o.min_chars):
            self.counts["empty"] += 1
            return
        self._buffer.append(request)
        if len(self._buffer) >= (WARMUP_RECORDS if self._chars_per_token is None else BATCH):
            self._flush()

    def held(self) -> int:
        """Texts held right now (for the bounded-memory guarantee)."""
        return (sum(len(r.items) for r in self._pool.values()) + len(self._holdout.items) + len(self._reference)
                + len(self._first_n) + len(self._buffer))

    def max_held(self) -> int:
        o = self.o
        return ((o.max_strata + 1) * OVERSAMPLE * o.samples + o.holdout_samples + o.reference_samples + o.samples
                + max(BATCH, WARMUP_RECORDS))

    def _flush(self) -> None:
        batch, self._buffer = self._buffer, []
        if not batch:
            return
        texts = [r.text for r in batch]
        if self.o.token_lengths == "exact":
            lengths = list(self.count_tokens(texts))
        else:
            if self._chars_per_token is None:
                tokens = sum(self.count_tokens(texts))
                self._chars_per_token = max(sum(map(len, texts)) / max(tokens, 1), 0.1)
            ratio = self._chars_per_token
            lengths = [max(1, round(len(t) / ratio)) for t in texts]
        for request, n in zip(batch, lengths):
            self._place(request, n)

    def _stratum(self, request: Request, n_tokens: int) -> str:
        parts, values = [], iter(request.fields)
        for f in self.o.stratify_by:
            parts.append(self._names[bisect.bisect_right(self.o.length_buckets, n_tokens)] if f == "length"
                         else f"{f}={next(values)}")
        key = "|".join(parts) if parts else "all"
        if key not in self.source_strata and len(self.source_strata) >= self.o.max_strata:
            return OTHER
        return key

    def _place(self, request: Request, n_tokens: int) -> None:
        o = self.o
        if n_tokens > o.max_record_tokens:
            self.counts["over_long"] += 1
            return
        stratum = self._stratum(request, n_tokens)
        self.source_strata[stratum] += 1
        usable = self.counts["usable"] = self.counts["usable"] + 1
        if len(self._reference) < o.reference_samples:
            self._reference.append((stratum, request.text))
        else:
            j = self._rng.randrange(usable)
            if j < o.reference_samples:
                self._reference[j] = (stratum, request.text)
        if len(self._first_n) < o.samples:
            self._first_n.append((stratum, request.text))
        holdout_value, priority = hash_key(dedupe_key(request.text), o.seed)
        self._sketch_add(priority)
        if holdout_value < o.holdout_fraction:
            self.counts["holdout_records"] += 1
            reservoir = self._holdout
        else:
            self.counts["pool_records"] += 1
            reservoir = self._pool.get(stratum)
            if reservoir is None:
                reservoir = self._pool[stratum] = _BottomK(OVERSAMPLE * o.samples)
        if reservoir.would_keep(priority):
            reservoir.offer(priority, lambda: _Entry(priority, request.text, request.content, request.system, stratum))

    def _sketch_add(self, priority: int) -> None:
        if priority in self._sketch_members:
            return
        if len(self._sketch) < SKETCH_SIZE:
            heapq.heappush(self._sketch, -priority)
            self._sketch_members.add(priority)
        elif priority < -self._sketch[0]:
            evicted = -heapq.heapreplace(self._sketch, -priority)
            self._sketch_members.discard(evicted)
            self._sketch_members.add(priority)

    def distinct_estimate(self) -> float:
        """Distinct usable texts: exact below the sketch size, else the bottom-k estimate (k - 1) / p_k."""
        if len(self._sketch) < SKETCH_SIZE:
            return float(len(self._sketch))
        return (SKETCH_SIZE - 1) / (-self._sketch[0] / 2**64)

    # -- the end of the stream
    def _redact(self, entry: _Entry, found: Counter) -> _Entry:
        """Redaction happens here, on what is kept, before anything is stored (the stream itself is not redacted:
        hashing and length do not need it, and redacting a million requests would dominate the pass)."""
        if self.o.redact:
            kinds: Counter = Counter()
            entry.text = redact(entry.text, kinds)
            entry.content = redact(entry.content)
            entry.system = redact(entry.system)
            found.update(kinds.keys())
        return entry

    def finish(self) -> SampleResult:
        self._flush()
        o = self.o
        redactions: Counter = Counter()
        holdout_index = NearDuplicateIndex(o.near_duplicate_threshold)
        holdout, holdout_keys = [], set()
        for entry in self._holdout.sorted():
            self._redact(entry, redactions)
            key = dedupe_key(entry.text)
            if key not in holdout_keys and not holdout_index.seen(entry.content, entry.system):
                holdout.append(entry)
                holdout_keys.add(key)

        candidates = {s: r.sorted() for s, r in self._pool.items()}
        caps = {s: len(c) for s, c in candidates.items()}
        index = NearDuplicateIndex(o.near_duplicate_threshold)
        accepted: dict[str, list[_Entry]] = {s: [] for s in candidates}
        keys: set[str] = set()
        pos = dict.fromkeys(candidates, 0)
        while True:
            alloc = allocate(dict(self.source_strata), o.samples, caps)
            short = False
            for s in sorted(candidates):
                while len(accepted[s]) < alloc.get(s, 0) and pos[s] < len(candidates[s]):
                    entry = self._redact(candidates[s][pos[s]], redactions)
                    pos[s] += 1
                    key = dedupe_key(entry.text)
                    if key in holdout_keys or key in keys:  # equal once redacted
                        self.counts["redacted_duplicates"] += 1
                    elif not index.seen(entry.content, entry.system):
                        accepted[s].append(entry)
                        keys.add(key)
                if len(accepted[s]) < alloc.get(s, 0):
                    caps[s] = len(accepted[s])
                    short = True
            if not short:
                break
        chosen = sorted((e for s in accepted for e in accepted[s][:alloc.get(s, 0)]), key=lambda e: e.priority)

        clean = redact if o.redact else (lambda t: t)
        n_tokens = self._exact([e.text for e in chosen])
        reference_tokens = self._exact([clean(t) for _, t in self._reference])
        first_n_tokens = self._exact([clean(t) for _, t in self._first_n])
        distinct = self.distinct_estimate()
        usable = self.counts["usable"]
        counts = dict(self.counts) | {
            "usable": usable,
            "candidates_examined": index.examined,
            "near_duplicates_removed": index.removed,
            "holdout_near_duplicates_removed": holdout_index.removed,
            "exact_duplicates_in_candidates": sum(r.repeats for r in self._pool.values()),
            "distinct_estimate": round(distinct),
            "duplicate_rate_estimate": round(max(0.0, 1 - distinct / usable), 4) if usable else 0.0,
            "near_duplicate_rate": round(index.removed / index.examined, 4) if index.examined else 0.0,
            "chars_per_token": round(self._chars_per_token, 3) if self._chars_per_token else None,
            "strata": len(self.source_strata),
        }
        return SampleResult(
            texts=tuple(e.text for e in chosen), strata=tuple(e.stratum for e in chosen), n_tokens=tuple(n_tokens),
            occurrences=tuple(e.occurrences for e in chosen), holdout=tuple(e.text for e in holdout),
            reference_strata=tuple(s for s, _ in self._reference), reference_tokens=tuple(reference_tokens),
            first_n_strata=tuple(s for s, _ in self._first_n), first_n_tokens=tuple(first_n_tokens),
            source_strata=dict(self.source_strata), counts=counts, redactions=dict(redactions))

    def _exact(self, texts: list[str]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(texts), BATCH):
            out.extend(self.count_tokens(texts[i:i + BATCH]))
        return out


def tokenizer_counter(tokenizer) -> TokenCounter:
    """Token counts as calibration sees them (no special tokens added: a rendered chat prompt already has them)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):  # the same tokenizer without offset tracking
        def fast(texts: list[str]) -> list[int]:
            return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)] if texts else []
        return fast

    def count(texts: list[str]) -> list[int]:
        if not texts:
            return []
        encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
        return [len(ids) for ids in encoded["input_ids"]]
    return count


def sample_log(paths: Iterable[str | Path], options: SamplingOptions, tokenizer,
               count_tokens: TokenCounter | None = None) -> SampleResult:
    """One streaming pass over the logs (read, render, hash, stratify, sample), then redaction, near-duplicate
    removal and exact token counts of what was kept."""
    sampler = Sampler(options, count_tokens or tokenizer_counter(tokenizer))
    sampler.consume(iter_requests(paths, tokenizer, fields=options.metadata_fields, redact_fields=options.redact))
    return sampler.finish()
