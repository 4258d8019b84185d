"""The vllm backend certified for real on one GPU: `enginewright run recipes/gpu-vllm.yaml` (Prefect's temporary
server, MLflow on SQLite, vLLM in its own environment: ENGINEWRIGHT_VLLM_PYTHON), then what a serving node does with
the champion (resolve --download --verify, then vLLM's server on the downloaded profile, one completion).

    python benchmarks/gpu/vllm_certify.py make-models --out /tmp/models   # small (trained here) + 8B-shaped (random)
    python benchmarks/gpu/vllm_certify.py run --model /tmp/models/small --out-file small.json [--set k=v ...]
    python benchmarks/gpu/vllm_certify.py serve-check --registered llama-small-vllm --out-file check.json
benchmarks/gpu/h200_vllm_session.sh runs them in the calls of one lease.

Each writes a JSON record: per format its accuracy, its latency at each concurrency with the speedup over bf16, the
engine's own report (quantization method, kernels, KV-cache capacity), stage times and the champion.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_models(args) -> dict:
    from benchmarks.gpu.pipeline_vs_modelopt import make_model as random_model
    from benchmarks.gpu.recovery_rungs import make_model as trained_model

    out = Path(args.out)
    started = time.perf_counter()
    small = trained_model(out / "small", hidden=args.small_hidden, layers=args.small_layers, vocab=8192,
                          train_steps=args.train_steps)
    small["seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    random_model("8b", out / "llama-8b", tokenizer_from=out / "small")
    record = {"small": small, "8b_seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(record, indent=2), flush=True)
    return record


def _speed(latency: dict, load: str) -> dict:
    s = latency.get(load) or {}
    return {k: s.get(k) for k in ("output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p95", "tpot_ms_p50", "tpot_ms_p95",
                                  "requests", "failed")}


def run(args) -> dict:
    home = Path(os.environ.get("ENGINEWRIGHT_HOME", ".enginewright")).resolve()
    name = args.name or Path(args.model).name
    result_file = home / f"run-{name}.json"
    cmd = [sys.executable, "-m", "flows.cli", "run", "recipes/gpu-vllm.yaml", "--json-out", str(result_file),
           "--set", "model.source=hf_dir", "--set", f"model.path={args.model}", "--set", f"model.name={name}",
           "--set", f"registry.name={name}", *[a for s in args.set or [] for a in ("--set", s)]]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = round(time.perf_counter() - started, 1)
    print(proc.stdout[-6000:], proc.stderr[-4000:], sep="\n", flush=True)
    record = {"command": " ".join(cmd), "exit_code": proc.returncode, "wall_s": wall}
    if not result_file.is_file():
        return record
    result = json.loads(result_file.read_text())
    rows = {r["format"]: r for r in result["rows"]}
    base = rows.get("none", {})
    loads = [k for k in (base.get("latency") or {}) if k.startswith("concurrency=")]
    formats = {}
    for fmt, row in rows.items():
        lat = row.get("latency") or {}
        speeds = {load: _speed(lat, load) for load in loads}
        for load in loads:
            b, c = _speed(base.get("latency") or {}, load), speeds[load]
            if b["output_tokens_per_s"] and c["output_tokens_per_s"]:
                c["speedup_over_bf16"] = round(c["output_tokens_per_s"] / b["output_tokens_per_s"], 3)
        engines = sorted((home / "profiles" / name / fmt).glob("*/*/engine.json"))
        formats[fmt] = {"status": row["status"], "reason": row.get("reason"), "accuracy": row.get("accuracy"),
                        "latency": speeds, "verdicts": row.get("verdicts"),
                        "engine": json.loads(engines[-1].read_text()) if engines else None}
    record |= {"formats": formats, "decisions": result["decisions"], "promotions": result["promotions"],
               "stages": result["stages"], "errors": result["errors"], "outcome": result.get("outcome")}
    print(json.dumps({k: v for k, v in record.items() if k != "stages"}, indent=2, default=str)[:8000], flush=True)
    return record


def serve_check(args) -> dict:
    """What a serving node does: resolve the champion, download and verify it, serve it with vLLM, ask it."""
    import httpx
    import yaml

    from tasks.backends.serving import free_port, run_server
    from tasks.backends.vllm import common

    dest = Path(args.dest).resolve()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "resolve", args.registered, "--gpu", "auto",
                           "--download", str(dest), "--verify"], cwd=ROOT, capture_output=True, text=True)
    record = {"resolve_exit_code": proc.returncode, "resolve_s": round(time.perf_counter() - started, 1),
              "resolve_stderr": proc.stderr[-2000:]}
    if proc.returncode != 0:
        return record
    answer = json.loads(proc.stdout)
    profile = Path(answer["profile_dir"])
    args_file = yaml.safe_load((profile / common.ENGINE_ARGS_FILE).read_text())
    port = free_port()
    cmd = common.serve_command(common.vllm_python(), profile / common.CHECKPOINT, args_file["args"],
                               host="127.0.0.1", port=port)
    started = time.perf_counter()
    with run_server(cmd, health_url=f"http://127.0.0.1:{port}/health", log_file=dest.parent / "serve-check.log",
                    timeout_s=900, env=common.server_env(profile), name="vllm"):
        ready = round(time.perf_counter() - started, 1)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                           json={"model": common.SERVED_NAME, "prompt": "The capital of France is", "max_tokens": 8,
                                 "temperature": 0}).json()
    record |= {"version": answer["version"], "alias": answer.get("alias"), "model_uri": answer.get("model_uri"),
               "files_checked": answer.get("files_checked"), "serve_ready_s": ready,
               "completion": reply["choices"][0]["text"], "served_by": cmd[:5]}
    print(json.dumps(record, indent=2), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-models")
    p.add_argument("--small-hidden", type=int, default=1024)
    p.add_argument("--small-layers", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=400)
    p = sub.add_parser("run")
    p.add_argument("--model", required=True)
    p.add_argument("--name")
    p.add_argument("--set", action="append")
    p = sub.add_parser("serve-check")
    p.add_argument("--registered", required=True)
    p.add_argument("--dest", default="downloaded")
    sub.choices["make-models"].add_argument("--out", required=True, help="where the models go")
    for p in sub.choices.values():
        p.add_argument("--out-file", help="the JSON record")
    args = parser.parse_args()
    record = {"make-models": make_models, "run": run, "serve-check": serve_check}[args.command](args)
    record["machine"] = _machine()
    if args.out_file:
        Path(args.out_file).write_text(json.dumps(record, indent=2, default=str))


def _machine() -> dict:
    from tasks.host import machine

    return machine.local_device() | {"toolchain": machine.toolchain()}


if __name__ == "__main__":
    main()
