"""Calibrate: sample N calibration texts from a dataset spec, with a held-out split that only evaluation sees.

The held-out split is chosen by hashing each text with the seed, so it does not depend on the order of the source or
on N: calibration never sees a held-out text, whatever the sample size.

Production request logs (``source: request_log``) are read in one streaming pass with a stratified, deduplicating,
redacting sampler (tasks/calibration/request_log.py). Every source also stores what the representativeness report
(tasks/calibration/representativeness.py) compares the sample against: a reference sample of the source with exact token
counts (``reference.parquet``), and for request logs the first-N slice and the per-stratum counts of the whole log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recipes.schema import CalibrationSpec, resolve_path
from tasks import store
from tasks.calibration import duplicates, redaction, request_log, request_reader

log = logging.getLogger(__name__)

REFERENCE_SAMPLES = 10_000  # non-request-log sources: distinct texts tokenized for the report's reference sample


@dataclass(frozen=True)
class CalibrationArtifact:
    path: str
    calibration_file: str
    holdout_file: str
    digest: str
    holdout_digest: str
    stats: dict
    cached: bool = False


def _pydoc_paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    return [p for text in topics.values() for p in re.split(r"\n\s*\n", text)]


def _file_texts(spec: CalibrationSpec, base_dir: Path) -> list[str]:
    import datasets

    texts: list[str] = []
    for raw in spec.paths:
        path = resolve_path(raw, base_dir)
        if path.suffix == ".txt":
            texts.extend(re.split(r"\n\s*\n", path.read_text()))
            continue
        builder = "parquet" if path.suffix == ".parquet" else "json"
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # e.g. a bare StopIteration for an empty file
            raise ValueError(
                f"calibration.paths: cannot read {path} as {builder}: {type(exc).__name__}: {exc}") from exc
        if spec.text_field not in ds.column_names:
            raise ValueError(f"calibration.text_field: column '{spec.text_field}' not in {path.name} "
                             f"(columns: {ds.column_names})")
        texts.extend(ds[spec.text_field])
    return texts


def _hub_texts(spec: CalibrationSpec) -> list[str]:
    import datasets

    ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.split, revision=spec.revision)
    if spec.text_field not in ds.column_names:
        raise ValueError(f"calibration.text_field: column '{spec.text_field}' not in {spec.dataset} "
                         f"(columns: {ds.column_names})")
    return list(ds[spec.text_field])


def source_fingerprint(spec: CalibrationSpec, base_dir: Path) -> str:
    if spec.source == "pydoc_topics":
        return store.key_of("pydoc_topics", _pydoc_paragraphs())
    if spec.source in ("files", "request_log"):
        return store.key_of(spec.source, [store.cached_sha256(resolve_path(p, base_dir)) for p in spec.paths])
    return store.key_of("hub", spec.dataset, spec.dataset_config, spec.split, spec.revision)


def tokenizer_fingerprint(model_dir: Path) -> str:
    files = sorted(p for p in Path(model_dir).iterdir() if "token" in p.name or p.name == "special_tokens_map.json")
    return store.key_of([(p.name, store.cached_sha256(p)) for p in files])


def _normalise(text: str) -> str:
    return " ".join(text.split())


def is_holdout(text: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_and_sample(texts: list[str], spec: CalibrationSpec) -> tuple[list[str], list[str], dict]:
    """Normalise, drop short texts, dedupe exactly, split off the holdout, then draw the seeded sample."""
    normalised = [_normalise(t) for t in texts if t and t.strip()]
    long_enough = [t for t in normalised if len(t) >= spec.min_chars]
    unique = list(dict.fromkeys(long_enough))
    holdout = [t for t in unique if is_holdout(t, spec.seed, spec.holdout_fraction)]
    pool = [t for t in unique if not is_holdout(t, spec.seed, spec.holdout_fraction)]
    if spec.pack:  # every usable text, in seeded order: pack_texts takes as many as the sequences need
        sample = random.Random(spec.seed).sample(pool, len(pool))
    elif len(pool) < spec.samples:
        raise ValueError(f"calibration.samples: asked for {spec.samples} but only {len(pool)} usable texts remain "
                         f"after dropping short ones (< {spec.min_chars} chars), duplicates and the holdout; "
                         "calibration.pack: true packs short texts into max_tokens-long sequences")
    else:
        sample = random.Random(spec.seed).sample(pool, spec.samples)
    counts = {"source_texts": len(texts), "dropped_short_or_empty": len(texts) - len(long_enough),
              "duplicates_removed": len(long_enough) - len(unique), "holdout": len(holdout), "pool": len(pool)}
    return sample, holdout, counts


def pack_texts(texts: list[str], tokenizer, *, samples: int, max_tokens: int) -> tuple[list[list[int]], int]:
    """Tokenize texts in order, each followed by the EOS token as the boundary, and cut the stream into ``samples``
    sequences of exactly ``max_tokens`` tokens. Returns the sequences and how many texts they used.

    Raises:
        ValueError: the texts hold fewer tokens than ``samples`` x ``max_tokens``, or the tokenizer has no EOS token.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("calibration.pack needs a tokenizer with an EOS token (the boundary between packed texts)")
    need, ids, used = samples * max_tokens, [], 0
    while len(ids) < need and used < len(texts):
        batch = texts[used:used + 256]
        for encoded in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.append(eos)
            used += 1
            if len(ids) >= need:
                break
    if len(ids) < need:
        raise ValueError(f"calibration.pack: {samples} sequences x {max_tokens} tokens need {need} tokens, but the "
                         f"{len(texts)} usable texts (after dropping short ones, duplicates and the holdout) hold "
                         f"{len(ids)}; lower calibration.samples or max_tokens, or use a larger source")
    return [ids[i * max_tokens:(i + 1) * max_tokens] for i in range(samples)], used


def cache_key(spec: CalibrationSpec, *, model_dir: str, base_dir: Path) -> str:
    sampling = spec.model_dump(mode="json", exclude={"representativeness"})  # thresholds do not change the set
    code = [sys.modules[__name__]]
    if spec.source == "request_log":  # the sampler, reader, redaction and duplicate rules decide the set too
        code += [request_log, request_reader, redaction, duplicates]
    return store.key_of("calibrate", source_fingerprint(spec, base_dir), sampling,
                        tokenizer_fingerprint(Path(model_dir)), store.source_digest(*code))


def out_dir(key: str) -> Path:
    return store.stage_dir("calibration", key)


def calibrate(spec: CalibrationSpec, *, model_dir: str, base_dir: Path) -> CalibrationArtifact:
    """Build the calibration set (parquet) and the held-out split, keyed by source content, sampling and tokenizer."""
    key = cache_key(spec, model_dir=model_dir, base_dir=base_dir)
    out = out_dir(key)
    manifest, cached = store.reuse_or_make(out, lambda out: _build(spec, model_dir, base_dir, key, out))
    return CalibrationArtifact(str(out), str(out / "calibration.parquet"), str(out / "holdout.parquet"),
                               manifest["digest"], manifest["holdout_digest"], manifest["stats"], cached)


def _build(spec: CalibrationSpec, model_dir: str, base_dir: Path, key: str, out: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if spec.source == "request_log":
        return _build_request_log(spec, tokenizer, base_dir, key, out)
    loaders = {"pydoc_topics": lambda: _pydoc_paragraphs(), "files": lambda: _file_texts(spec, base_dir),
               "hub": lambda: _hub_texts(spec)}
    texts = loaders[spec.source]()
    sample, holdout, counts = split_and_sample(texts, spec)
    count = request_log.tokenizer_counter(tokenizer)
    packed = None
    if spec.pack:
        packed, used = pack_texts(sample, tokenizer, samples=spec.samples, max_tokens=spec.max_tokens)
        sample = sample[:used]
        counts["packed_from_texts"] = used
    lengths = count(sample)
    normalised = (_normalise(t) for t in texts if t and t.strip())
    usable = list(dict.fromkeys(t for t in normalised if len(t) >= spec.min_chars))
    reference = random.Random(spec.seed).sample(usable, min(len(usable), REFERENCE_SAMPLES))
    edges = request_log.DEFAULT_LENGTH_BUCKETS
    names = request_log.length_bucket_names(edges)
    reference_tokens = count(reference)
    report_inputs = {
        "reference": pd.DataFrame({"n_tokens": reference_tokens,
                                   "stratum": [request_log.length_bucket(n, edges, names) for n in reference_tokens]}),
        "source": {"source": spec.source, "duplicates": {
            "source_texts": counts["source_texts"], "duplicates_removed": counts["duplicates_removed"],
            "duplicate_rate": round(counts["duplicates_removed"] / max(1, counts["source_texts"]), 4),
            "dropped_short_or_empty": counts["dropped_short_or_empty"]}},
    }
    strata = [request_log.length_bucket(n, edges, names) for n in lengths]
    if packed is None:
        return _write(spec, key, out, sample, lengths, strata, holdout, counts, report_inputs)
    # Packed: the rows are the token sequences quantize feeds; the report compares the texts they were cut from.
    report_inputs["sample_texts"] = pd.DataFrame({"n_tokens": lengths, "stratum": strata})
    n = spec.max_tokens
    return _write(spec, key, out, tokenizer.batch_decode(packed), [n] * len(packed), ["packed"] * len(packed),
                  holdout, counts, report_inputs, {"input_ids": packed})


def _write(spec: CalibrationSpec, key: str, out: Path, sample: list[str], lengths: list[int], strata: list[str],
           holdout: list[str], counts: dict, report_inputs: dict, extra_columns: dict | None = None) -> dict:
    calib = pd.DataFrame({"text": sample, "n_tokens": lengths, "truncated": [n > spec.max_tokens for n in lengths],
                          "stratum": strata, **(extra_columns or {})})
    quantiles = calib["n_tokens"].quantile([0.0, 0.5, 0.9, 1.0]).round().astype(int).tolist()
    stats = counts | {
        "count": len(calib),
        "tokens_min": quantiles[0], "tokens_p50": quantiles[1], "tokens_p90": quantiles[2], "tokens_max": quantiles[3],
        "truncated_to_max_tokens": int(calib["truncated"].sum()),
    }
    with store.atomic_dir(out) as tmp:
        calib.to_parquet(tmp / "calibration.parquet", index=False)
        pd.DataFrame({"text": holdout}).to_parquet(tmp / "holdout.parquet", index=False)
        report_inputs["reference"].to_parquet(tmp / "reference.parquet", index=False)
        if "sample_texts" in report_inputs:
            report_inputs["sample_texts"].to_parquet(tmp / "sample_texts.parquet", index=False)
        if "first_n" in report_inputs:
            report_inputs["first_n"].to_parquet(tmp / "first_n.parquet", index=False)
        (tmp / "source.json").write_text(json.dumps(report_inputs["source"], indent=1, sort_keys=True))
        manifest = store.write_manifest(tmp, {
            "stage": "calibrate", "key": key, "spec": spec.model_dump(mode="json"), "stats": stats,
            "digest": store.key_of(sample, spec.max_tokens, *([extra_columns["input_ids"]] if spec.pack else [])),
            "holdout_digest": store.key_of(holdout),
        })
    log.info("calibration set: %d texts, tokens p50 %d, %d duplicates removed, %d held out",
             stats["count"], stats["tokens_p50"], stats["duplicates_removed"], stats["holdout"])
    return manifest


def _build_request_log(spec: CalibrationSpec, tokenizer, base_dir: Path, key: str, out: Path) -> dict:
    """One streaming pass over the logs (bounded memory), then exact token counts of what was kept."""
    options = request_log.SamplingOptions.from_spec(spec)
    paths = [resolve_path(p, base_dir) for p in spec.paths]
    try:
        result = request_log.sample_log(paths, options, tokenizer)
    except request_reader.ChatTemplateMissing as exc:
        raise ValueError(str(exc)) from None
    c = result.counts
    if len(result.texts) < spec.samples:
        raise ValueError(f"calibration.samples: asked for {spec.samples} but only {len(result.texts)} usable distinct "
                         f"requests remain in the log after dropping {c.get('empty', 0)} empty, "
                         f"{c.get('over_long', 0)} over-long and {c.get('malformed', 0)} malformed records, "
                         f"{c['near_duplicates_removed']} near duplicates and the holdout "
                         f"({c.get('holdout_records', 0)} records)")
    if not result.holdout:
        raise ValueError("calibration.holdout_fraction: no request of the log fell in the held-out split; "
                         "raise holdout_fraction or use a larger log")
    duplicates = {k: c.get(k, 0) for k in (
        "records", "usable", "empty", "over_long", "malformed", "unsupported", "template_error", "pool_records",
        "holdout_records", "distinct_estimate", "duplicate_rate_estimate", "exact_duplicates_in_candidates",
        "candidates_examined", "near_duplicates_removed", "near_duplicate_rate", "holdout_near_duplicates_removed",
        "chars_per_token")} | {f"redacted_{k}": v for k, v in sorted(result.redactions.items())}
    counts = {
        "source_texts": c["records"], "usable": c["usable"],
        "dropped_short_or_empty": c.get("empty", 0), "dropped_over_long": c.get("over_long", 0),
        "dropped_malformed": c.get("malformed", 0) + c.get("unsupported", 0) + c.get("template_error", 0),
        "duplicates_removed": c["exact_duplicates_in_candidates"] + c["near_duplicates_removed"],
        "near_duplicates_removed": c["near_duplicates_removed"],
        "duplicate_rate_estimate": c["duplicate_rate_estimate"],
        "holdout": len(result.holdout), "holdout_records": c.get("holdout_records", 0),
        "pool": c.get("pool_records", 0), "strata": len(result.source_strata),
        "redacted": sum(result.redactions.values()),
    }
    report_inputs = {
        "reference": pd.DataFrame({"n_tokens": list(result.reference_tokens),
                                   "stratum": list(result.reference_strata)}),
        "first_n": pd.DataFrame({"n_tokens": list(result.first_n_tokens), "stratum": list(result.first_n_strata)}),
        "source": {"source": "request_log", "strata": result.source_strata, "duplicates": duplicates,
                   "stratify_by": list(options.stratify_by), "length_buckets": list(options.length_buckets),
                   "token_lengths": options.token_lengths},
    }
    return _write(spec, key, out, list(result.texts), list(result.n_tokens), list(result.strata), list(result.holdout),
                  counts, report_inputs, {"occurrences": list(result.occurrences)})
