"""The latency stage: load through the profile's OpenAI-compatible streaming endpoint, with serving metric definitions.

Every backend is driven the same way: the backend's `serve()` starts its server (trtllm-serve, or the reference
server), and this client sends fixed-length streaming completions (EOS ignored) under each load profile of the
recipe: closed-loop fixed concurrency levels and open-loop Poisson arrival rates (seeded).

Definitions (those of vLLM's `bench serve`): TTFT = first streamed chunk with a choice - request start;
TPOT = (E2E - TTFT) / (N - 1) with N the output tokens, so the first token is excluded; ITL = gaps between
consecutive chunks, pooled over requests; E2E = last chunk - start; output tokens/s and requests/s over the wall
duration of the measured requests. Warm-up requests go first and are excluded; failed requests are counted.
Why our own client rather than GuideLLM or AIPerf: see the README ("Latency benchmark").
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recipes.schema import LatencySpec
from tasks import store
from tasks.validation.host_load import LoadSampler

log = logging.getLogger(__name__)
PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class LatencyResult:
    path: str
    summary: dict  # per load profile ("concurrency=1", "rate=2.0"): ttft_ms_p50..p99, tpot_*, itl_*, e2e_*, tok/s
    seconds: float
    cached: bool = False


def request_metrics(start: float, token_times: list[float], output_tokens: int | None = None) -> dict:
    n = output_tokens or len(token_times)
    ttft = token_times[0] - start
    e2e = token_times[-1] - start
    return {"ttft": ttft, "e2e": e2e, "output_tokens": n,
            "tpot": (e2e - ttft) / (n - 1) if n > 1 else None,
            "itl": list(np.diff(token_times)) if len(token_times) > 1 else []}


def summarize(records: list[dict], duration: float) -> dict:
    """Percentiles (ms) of TTFT, TPOT, ITL and E2E, plus throughput, from per-request token arrival times."""
    per_request = [request_metrics(r["start"], r["token_times"], r.get("output_tokens"))
                   for r in records if r["token_times"] and not r.get("error")]
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


async def stream_completion(client, base_url: str, model: str, prompt: list[int], output_tokens: int) -> dict:
    """One streaming request; returns start time, arrival time of each chunk, usage tokens, error, parse time."""
    payload = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "min_tokens": output_tokens,
               "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    record = {"start": time.perf_counter(), "token_times": [], "output_tokens": None, "error": None, "parse_s": 0.0}
    try:
        async with client.stream("POST", f"{base_url}/completions", json=payload) as response:
            if response.status_code != 200:
                record["error"] = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                arrived = time.perf_counter()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    record["token_times"].append(arrived)
                if chunk.get("usage"):
                    record["output_tokens"] = chunk["usage"].get("completion_tokens")
                record["parse_s"] += time.perf_counter() - arrived
    except Exception as exc:  # noqa: BLE001 - a failed request is a result to count, not a crash
        record["error"] = f"{type(exc).__name__}: {exc}"
    if not record["token_times"] and not record["error"]:
        record["error"] = "no chunk with a choice was received"
    return record


async def run_load(base_url: str, model: str, prompts: list[list[int]], *, output_tokens: int,
                   concurrency: int | None = None, rate: float | None = None, seed: int = 0,
                   timeout_s: float = 600) -> tuple[list[dict], float]:
    """Closed loop at `concurrency`, or open loop with Poisson arrivals at `rate` requests/s. Returns records and
    the wall duration from the first dispatch to the last completion."""
    import httpx

    limits = httpx.Limits(max_connections=max(concurrency or 0, 64))
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:
        started = time.perf_counter()
        if rate is None:
            gate = asyncio.Semaphore(concurrency or 1)

            async def closed(p):
                async with gate:
                    return await stream_completion(client, base_url, model, p, output_tokens)

            records = await asyncio.gather(*(closed(p) for p in prompts))
        else:
            gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=len(prompts))

            async def opened(p, at):
                await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
                return await stream_completion(client, base_url, model, p, output_tokens)

            records = await asyncio.gather(*(opened(p, at) for p, at in zip(prompts, np.cumsum(gaps) - gaps[0])))
        return list(records), time.perf_counter() - started


def deployment_speed(backend_name: str) -> bool:
    """Whether this backend's measured speed is what a deployment would see (its backend module declares it)."""
    from tasks.backends import get as backend

    return bool(backend(backend_name).SPEED_IS_DEPLOYMENT)


def speed_label(backend_name: str) -> str:
    from tasks.backends import get as backend

    return getattr(backend(backend_name), "SPEED_LABEL", "")


def conditions(manifest: dict, backend_name: str, load: str, spec: LatencySpec, device: dict) -> str:
    """What must match for two speed numbers to be compared: runtime, machine kind, load profile, request shape."""
    target = manifest["target"]
    machine = target.get("gpu_name") or device.get("cpu") or "cpu"
    return (f"{backend_name}/{target['arch']}/{machine}/tp{target.get('tp', 1)}/{load}"
            f"/in{spec.input_tokens}-out{spec.output_tokens}")


def load_profiles(spec: LatencySpec) -> dict[str, dict]:
    return ({f"concurrency={c}": {"concurrency": c} for c in spec.concurrency}
            | {f"rate={r:g}": {"rate": r} for r in spec.request_rates})


def cache_key(*, profile_fp: str, spec: LatencySpec, holdout_digest: str, device: dict) -> str:
    # full_on_reference only chooses the spec passed here (flows/target.py); the load itself is what is measured
    return store.key_of("latency", profile_fp, spec.model_dump(mode="json", exclude={"full_on_reference"}),
                        holdout_digest, device["arch"],
                        device.get("gpu_name"), device.get("cpu"), store.source_digest(sys.modules[__name__]))


def not_measured(why: str, spec: LatencySpec) -> LatencyResult:
    """The latency of a candidate that was not measured, and why: every load profile's summary says so
    (`not_measured`), so the gates, the report, the run record and MLflow all carry the reason instead of numbers."""
    summary: dict = {name: {"not_measured": why} for name in load_profiles(spec)}
    return LatencyResult("", summary | {"not_measured": why}, 0.0)


def measure_latency(*, profile_dir: str, profile_fp: str, backend_name: str, spec: LatencySpec, holdout_file: str,
                    holdout_digest: str, device: dict) -> LatencyResult:
    """Measure one profile on this machine through its endpoint; cached by profile, load spec, prompts, machine."""
    key = cache_key(profile_fp=profile_fp, spec=spec, holdout_digest=holdout_digest, device=device)
    out = store.stage_dir("latency", key)
    manifest, cached = store.reuse_or_make(out, lambda out: _run(profile_dir, backend_name, spec, holdout_file, key,
                                                                 out, device))
    return LatencyResult(str(out), manifest["summary"], manifest["seconds"], cached)


def _run(profile_dir, backend_name, spec, holdout_file, key, out, device) -> dict:
    from transformers import AutoTokenizer

    from tasks.backends import get as backend
    from tasks.backends.serving import free_port
    from tasks.profiles.profile import verify_artifact

    manifest = verify_artifact(profile_dir, device=device)
    tokenizer = AutoTokenizer.from_pretrained(Path(profile_dir) / "checkpoint")
    texts = pd.read_parquet(holdout_file)["text"].tolist()
    started = time.perf_counter()
    summary: dict = {}
    rows = []
    with store.atomic_dir(out) as tmp:
        with backend(backend_name).serve(Path(profile_dir), port=free_port(), log_file=tmp / "server.log") as url:
            for i, (name, load) in enumerate(load_profiles(spec).items()):
                prompts = fixed_length_prompts(texts, tokenizer, count=spec.warmup + spec.requests,
                                               input_tokens=spec.input_tokens, seed=spec.seed + i)
                warm, measured = prompts[:spec.warmup], prompts[spec.warmup:]
                if warm:
                    asyncio.run(run_load(url, "profile", warm, output_tokens=spec.output_tokens, concurrency=1))
                with LoadSampler() as sampler:
                    records, duration = asyncio.run(run_load(url, "profile", measured,
                                                             output_tokens=spec.output_tokens, seed=spec.seed + i,
                                                             **load))
                chunks = sum(len(r["token_times"]) for r in records)
                host = sampler.summary()
                summary[name] = summarize(records, duration) | load | {
                    "client_parse_ms_per_chunk": 1000 * sum(r["parse_s"] for r in records) / max(chunks, 1),
                    "errors": sorted({r["error"] for r in records if r["error"]})[:5], "host_load": host,
                    "host_foreign_cpu_cores": host.get("foreign_cpu_cores_mean"),
                    "host_load_1m": host.get("load_1m_mean"), "host_reliable": host["reliable"],
                    "conditions": conditions(manifest, backend_name, name, spec, device)}
                if not host["reliable"]:
                    log.warning("latency %s under %s: %s", Path(profile_dir).name, name, host["note"])
                rows += [{"profile": name, "start": r["start"], "token_times": r["token_times"],
                          "output_tokens": r["output_tokens"], "error": r["error"]} for r in records]
        summary["runtime"] = f"{backend_name} ({manifest['target']['arch']})"
        summary["deployment_speed"] = deployment_speed(backend_name)
        summary["speed_label"] = speed_label(backend_name)
        summary["input_tokens"], summary["output_tokens_per_request"] = spec.input_tokens, spec.output_tokens
        pd.DataFrame(rows).to_parquet(tmp / "requests.parquet", index=False)
        return store.write_manifest(tmp, {"stage": "latency", "key": key, "summary": summary,
                                          "seconds": round(time.perf_counter() - started, 2)})
