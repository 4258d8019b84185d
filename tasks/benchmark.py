"""Validate (latency): fixed-length requests against a built profile, summarised with the serving metric definitions.

Definitions (as in vLLM's `bench serve`, GuideLLM and AIPerf): TTFT = first token arrival - request start;
TPOT = (E2E - TTFT) / (N - 1), so the first token is excluded; ITL = gaps between consecutive tokens (pooled over
requests); E2E = last token arrival - start; output tokens/s = all output tokens / wall duration of the measured
requests. Warm-up requests are sent first and excluded.
"""

from __future__ import annotations

import logging
import sys
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recipes.schema import LatencySpec
from tasks import store

log = logging.getLogger(__name__)
PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class LatencyResult:
    path: str
    summary: dict  # ttft_ms_p50, ..., tpot_ms_p95, output_tokens_per_s, requests_per_s, runtime
    seconds: float
    cached: bool = False


def request_metrics(start: float, token_times: list[float]) -> dict:
    n = len(token_times)
    ttft = token_times[0] - start
    e2e = token_times[-1] - start
    return {"ttft": ttft, "e2e": e2e, "output_tokens": n,
            "tpot": (e2e - ttft) / (n - 1) if n > 1 else None,
            "itl": list(np.diff(token_times)) if n > 1 else []}


def summarize(records: list[dict], duration: float) -> dict:
    """Percentiles (ms) of TTFT, TPOT, ITL and E2E, plus throughput, from per-request token arrival times."""
    per_request = [request_metrics(r["start"], r["token_times"]) for r in records if r["token_times"]]
    failed = len(records) - len(per_request)
    summary: dict = {"requests": len(per_request), "failed": failed, "duration_s": duration}
    series = {"ttft": [m["ttft"] for m in per_request], "e2e": [m["e2e"] for m in per_request],
              "tpot": [m["tpot"] for m in per_request if m["tpot"] is not None],
              "itl": [gap for m in per_request for gap in m["itl"]]}
    for name, values in series.items():
        if values:
            summary[f"{name}_ms_mean"] = float(np.mean(values) * 1000)
            for p in PERCENTILES:
                summary[f"{name}_ms_p{p}"] = float(np.percentile(values, p) * 1000)
    total_out = sum(m["output_tokens"] for m in per_request)
    summary["output_tokens"] = total_out
    summary["output_tokens_per_s"] = total_out / duration if duration > 0 else None
    summary["requests_per_s"] = len(per_request) / duration if duration > 0 else None
    return summary


def fixed_length_prompts(texts: list[str], tokenizer, *, count: int, input_tokens: int, seed: int) -> list[list[int]]:
    """`count` prompts of exactly `input_tokens` token ids, cut at seeded offsets from the held-out text."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    if len(ids) <= input_tokens:
        raise ValueError(f"latency.input_tokens={input_tokens} is longer than the held-out text ({len(ids)} tokens)")
    rng = random.Random(seed)
    return [ids[o:o + input_tokens] for o in (rng.randrange(0, len(ids) - input_tokens) for _ in range(count))]


def cache_key(*, profile_fp: str, spec: LatencySpec, holdout_digest: str, device: dict) -> str:
    return store.key_of("latency", profile_fp, spec.model_dump(mode="json"), holdout_digest, device["arch"],
                        device.get("gpu_name"), device.get("cpu"), store.source_digest(sys.modules[__name__]))


def measure_latency(*, profile_dir: str, profile_fp: str, backend_name: str, spec: LatencySpec, holdout_file: str,
                    holdout_digest: str, device: dict) -> LatencyResult:
    """Measure one profile on this machine; cached by profile, load spec, prompts and machine."""
    key = cache_key(profile_fp=profile_fp, spec=spec, holdout_digest=holdout_digest, device=device)
    out = store.stage_dir("latency", key)
    manifest = store.read_manifest(out)
    cached = manifest is not None
    if manifest is None:
        manifest = _run(profile_dir, backend_name, spec, holdout_file, key, out)
    return LatencyResult(str(out), manifest["summary"], manifest["seconds"], cached)


def _run(profile_dir, backend_name, spec, holdout_file, key, out) -> dict:
    from transformers import AutoTokenizer

    from tasks.build import backend, verify_artifact

    manifest = verify_artifact(profile_dir)
    impl = backend(backend_name)
    tokenizer = AutoTokenizer.from_pretrained(Path(profile_dir) / "checkpoint")
    texts = pd.read_parquet(holdout_file)["text"].tolist()
    prompts = fixed_length_prompts(texts, tokenizer, count=spec.warmup + spec.requests,
                                   input_tokens=spec.input_tokens, seed=spec.seed)
    started = time.perf_counter()
    records = impl.time_generation(Path(profile_dir), prompts, output_tokens=spec.output_tokens, warmup=spec.warmup)
    measured_from = records[0]["start"]
    duration = max(r["token_times"][-1] for r in records if r["token_times"]) - measured_from
    summary = summarize(records, duration) | {
        "runtime": f"{backend_name} ({manifest['target']['arch']})", "concurrency": 1,
        "input_tokens": spec.input_tokens, "output_tokens_per_request": spec.output_tokens}
    with store.atomic_dir(out) as tmp:
        pd.DataFrame([{"start": r["start"], "token_times": r["token_times"]} for r in records]).to_parquet(
            tmp / "requests.parquet", index=False)
        return store.write_manifest(tmp, {"stage": "latency", "key": key, "summary": summary,
                                          "seconds": round(time.perf_counter() - started, 2)})
