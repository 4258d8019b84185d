"""No shared disk between hosts: two workers with their own ENGINEWRIGHT_HOME, in two work pools, share only the
Prefect server and the MLflow server (both on PostgreSQL) with its artifact store. The demo model is quantized by the
`quantizer` pool's worker and built, validated and promoted by the `builder` pool's; a third process with an empty
home resolves the champion, downloads and verifies it, and loads it with the reference backend."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from servers import clean_env
from test_demo_flow import SMALL

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REGISTERED = "smollm2-135m-reference"


def _recipe(tmp_path: Path) -> Path:
    recipe = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    recipe["name"] = "cross-host"
    recipe["quantization"]["work_pool"] = "quantizer"
    recipe["targets"] = [{"name": "local", "work_pool": "builder"}]
    path = tmp_path / "cross-host.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _prefect_file(tmp_path: Path, recipe: Path) -> Path:
    config = {"name": "cross-host", "pull": [{"flows.deploy.enter_project": {}}],
              "enginewright": {"default_pool": "builder", "work_pools": {
                  "builder": {"gpu": "none"}, "quantizer": {"gpu": "none"}}},
              "deployments": [{"name": "xhost", "entrypoint": "flows/pipeline.py:certify",
                               "parameters": {"recipe_path": str(recipe), "overrides": SMALL},
                               "work_pool": {"name": "builder"}}]}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _flow_runs(api: str) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30, trust_env=False).json()


def test_quantize_on_one_host_build_on_another_then_serve_from_a_third(prefect_server, mlflow_server, worker,
                                                                        tmp_path):
    homes = {name: tmp_path / f"home-{name}" for name in ("quantizer", "builder", "server")}
    common = {"MLFLOW_TRACKING_URI": mlflow_server.url, "ENGINEWRIGHT_PROJECT_DIR": str(ROOT),
              "PYTHONPATH": str(ROOT)}
    recipe = _recipe(tmp_path)
    prefect_file = _prefect_file(tmp_path, recipe)
    env = clean_env(PREFECT_API_URL=prefect_server.url, **common, ENGINEWRIGHT_HOME=str(tmp_path / "deployer"))
    deployed = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--prefect-file", str(prefect_file)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "quantize/xhost-quantize" in deployed.stdout and "certify/xhost-builder" in deployed.stdout

    workers = {pool: worker(pool, common | {"ENGINEWRIGHT_HOME": str(homes[pool])}, limit=2)
               for pool in ("quantizer", "builder")}
    started = subprocess.run([sys.executable, "-c", (
        "import sys; from prefect.deployments import run_deployment; "
        "print(run_deployment(sys.argv[1], timeout=0).id)"), "certify/xhost-builder"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip().splitlines()[-1]

    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline:
        state = httpx.get(f"{prefect_server.url}/flow_runs/{run_id}", timeout=30, trust_env=False).json()["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(5)
    logs = "\n".join(f"--- {p}\n{w.tail(6000)}" for p, w in workers.items())
    assert state["type"] == "COMPLETED", f"{state}\n{logs}"

    runs = {r["name"]: r for r in _flow_runs(prefect_server.url)}
    quantize_runs = [r for r in runs.values() if r["state_type"] == "COMPLETED" and r["id"] != run_id]
    assert quantize_runs, "the quantize deployment never ran"
    # Each host did its own part: quantization only under the quantizer's home, builds only under the builder's.
    assert not (homes["quantizer"] / "profiles").exists()
    assert list((homes["builder"] / "profiles").rglob("manifest.json"))
    [made] = (homes["quantizer"] / "quantized" / "fp8").glob("*/manifest.json")
    fetched = homes["builder"] / made.relative_to(homes["quantizer"])
    assert fetched.read_text() == made.read_text()  # the same artifact (its timings too): fetched, not recomputed
    # the base weights the checkpoint hard-links travelled once, with the model: here they are links into its entry
    model_files = {p.stat().st_ino for p in (homes["builder"] / "models").rglob("*.safetensors")}
    assert any(p.stat().st_ino in model_files for p in fetched.parent.rglob("*.safetensors"))

    server_env = clean_env(**common, ENGINEWRIGHT_HOME=str(homes["server"]))
    dest = tmp_path / "served"
    resolved = subprocess.run([sys.executable, "-m", "flows.cli", "resolve", REGISTERED, "--download", str(dest),
                               "--verify"], cwd=ROOT, env=server_env, capture_output=True, text=True, timeout=600)
    assert resolved.returncode == 0, resolved.stderr
    answer = json.loads(resolved.stdout)
    profile = Path(answer["profile_dir"])
    assert profile.is_relative_to(dest)  # fetched from the artifact store, not read from the builder's home

    load = ("import sys; from pathlib import Path; from tasks.backends import reference; "
            "model, tok = reference.load_model(Path(sys.argv[1])); print('loaded', type(model).__name__)")
    loaded = subprocess.run([sys.executable, "-c", load, str(profile)], cwd=ROOT, env=server_env, capture_output=True,
                            text=True, timeout=600)
    assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr[-3000:]

    weights = next(p for p in (profile / "checkpoint").glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.seek(1024)
        byte = f.read(1)
        f.seek(1024)
        f.write(bytes([byte[0] ^ 1]))
    refused = subprocess.run([sys.executable, "-m", "flows.cli", "resolve", REGISTERED, "--download", str(dest),
                              "--verify"], cwd=ROOT, env=server_env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert f"checkpoint/{weights.name}: sha256" in refused.stderr
