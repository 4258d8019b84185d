"""Calibrate: sample N calibration texts from a dataset spec, with a held-out split that only evaluation sees.

The held-out split is chosen by hashing each text with the seed, so it does not depend on the order of the source or
on N: calibration never sees a held-out text, whatever the sample size.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sys
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recipes.schema import CalibrationSpec, resolve_path
from tasks import store

log = logging.getLogger(__name__)


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
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        if spec.text_field not in ds.column_names:
            raise ValueError(f"calibration.text_field: column '{spec.text_field}' not in {path.name} (columns: {ds.column_names})")
        texts.extend(ds[spec.text_field])
    return texts


def _hub_texts(spec: CalibrationSpec) -> list[str]:
    import datasets

    ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.split, revision=spec.revision)
    if spec.text_field not in ds.column_names:
        raise ValueError(f"calibration.text_field: column '{spec.text_field}' not in {spec.dataset} (columns: {ds.column_names})")
    return list(ds[spec.text_field])


def source_fingerprint(spec: CalibrationSpec, base_dir: Path) -> str:
    if spec.source == "pydoc_topics":
        return store.key_of("pydoc_topics", _pydoc_paragraphs())
    if spec.source == "files":
        return store.key_of("files", [store.sha256_file(resolve_path(p, base_dir)) for p in spec.paths])
    return store.key_of("hub", spec.dataset, spec.dataset_config, spec.split, spec.revision)


def tokenizer_fingerprint(model_dir: Path) -> str:
    files = sorted(p for p in Path(model_dir).iterdir() if "token" in p.name or p.name == "special_tokens_map.json")
    return store.key_of([(p.name, store.sha256_file(p)) for p in files])


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
    if len(pool) < spec.samples:
        raise ValueError(f"calibration.samples: asked for {spec.samples} but only {len(pool)} usable texts remain "
                         f"after dropping short ones (< {spec.min_chars} chars), duplicates and the holdout")
    sample = random.Random(spec.seed).sample(pool, spec.samples)
    counts = {"source_texts": len(texts), "dropped_short_or_empty": len(texts) - len(long_enough),
              "duplicates_removed": len(long_enough) - len(unique), "holdout": len(holdout), "pool": len(pool)}
    return sample, holdout, counts


def calibrate(spec: CalibrationSpec, *, model_dir: str, base_dir: Path) -> CalibrationArtifact:
    """Build the calibration set (parquet) and the held-out split, keyed by source content, sampling and tokenizer."""
    key = store.key_of("calibrate", source_fingerprint(spec, base_dir), spec.model_dump(mode="json"),
                       tokenizer_fingerprint(Path(model_dir)), store.source_digest(sys.modules[__name__]))
    out = store.stage_dir("calibration", key)
    manifest = store.read_manifest(out)
    if manifest is None:
        manifest = _build(spec, model_dir, base_dir, key, out)
        cached = False
    else:
        cached = True
    return CalibrationArtifact(str(out), str(out / "calibration.parquet"), str(out / "holdout.parquet"),
                               manifest["digest"], manifest["holdout_digest"], manifest["stats"], cached)


def _build(spec: CalibrationSpec, model_dir: str, base_dir: Path, key: str, out: Path) -> dict:
    from transformers import AutoTokenizer

    loaders = {"pydoc_topics": lambda: _pydoc_paragraphs(), "files": lambda: _file_texts(spec, base_dir),
               "hub": lambda: _hub_texts(spec)}
    texts = loaders[spec.source]()
    sample, holdout, counts = split_and_sample(texts, spec)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"]]
    calib = pd.DataFrame({"text": sample, "n_tokens": lengths,
                          "truncated": [n > spec.max_tokens for n in lengths]})
    quantiles = calib["n_tokens"].quantile([0.0, 0.5, 0.9, 1.0]).round().astype(int).tolist()
    stats = counts | {
        "count": len(calib),
        "tokens_min": quantiles[0], "tokens_p50": quantiles[1], "tokens_p90": quantiles[2], "tokens_max": quantiles[3],
        "truncated_to_max_tokens": int(calib["truncated"].sum()),
    }
    with store.atomic_dir(out) as tmp:
        calib.to_parquet(tmp / "calibration.parquet", index=False)
        pd.DataFrame({"text": holdout}).to_parquet(tmp / "holdout.parquet", index=False)
        manifest = store.write_manifest(tmp, {
            "stage": "calibrate", "key": key, "spec": spec.model_dump(mode="json"), "stats": stats,
            "digest": store.key_of(sample, spec.max_tokens), "holdout_digest": store.key_of(holdout),
        })
    log.info("calibration set: %d texts, tokens p50 %d, %d duplicates removed, %d held out",
             stats["count"], stats["tokens_p50"], stats["duplicates_removed"], stats["holdout"])
    return manifest
