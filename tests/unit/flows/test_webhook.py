"""The CI webhook receiver (flows/webhook.py) with the Prefect call faked at the edge, and the model -> deployment
routes it gets from prefect.yaml (flows/deploy.py). No server."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import threading
import uuid
import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():  # starlette 1.x would rather have httpx2 behind its TestClient
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from flows import webhook
from flows.deploy import DeployError, load_plan

ROOT = Path(__file__).resolve().parents[3]
SECRET = b"unit-test-secret-0123456789"
KILLED_RECEIVER = """import json, os, sys
from flows import webhook
webhook.DeliveryLog(sys.argv[1]).claim(webhook.ModelVersionEvent(**json.loads(sys.argv[2])))
os._exit(9)
"""
NOW = 1_800_000_000
ROUTES = {"smollm2-135m": ["certify/smollm2-135m-demo-cpu"]}


class FakePrefect:
    """Stands in for the Prefect API: records each flow run it is asked to start."""

    def __init__(self, fail: bool = False):
        self.calls: list[dict] = []
        self.fail = fail

    async def __call__(self, deployment: str, parameters: dict, idempotency_key: str, tags: list[str]) -> str:
        if self.fail:
            raise RuntimeError("prefect server unreachable")
        self.calls.append({"deployment": deployment, "parameters": parameters, "idempotency_key": idempotency_key,
                           "tags": tags})
        return str(uuid.uuid5(uuid.NAMESPACE_URL, idempotency_key))


def make_client(tmp_path: Path, launcher=None, *, clock=lambda: NOW, max_bytes: int = 4096) -> TestClient:
    settings = webhook.Settings(secret=SECRET, tolerance_s=300, max_bytes=max_bytes, db_path=tmp_path / "d.db")
    return TestClient(webhook.create_app(ROUTES, settings, launcher or FakePrefect(), clock=clock))


def event(**fields) -> dict:
    return {"delivery_id": "ci-1", "model": "smollm2-135m", "version": "2", "location": "/models/smollm2/v2"} | fields


def post(client: TestClient, body: dict | bytes, *, timestamp: int = NOW, secret: bytes = SECRET,
         signature: str | None = None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {webhook.TIMESTAMP_HEADER: str(timestamp),
               webhook.SIGNATURE_HEADER: signature or webhook.sign(secret, timestamp, raw),
               "Content-Type": "application/json"}
    return client.post(webhook.PATH, content=raw, headers=headers)


def test_signed_delivery_starts_one_run_per_deployment_and_answers_202_with_its_id(tmp_path):
    prefect = FakePrefect()
    answer = post(make_client(tmp_path, prefect), event())
    assert answer.status_code == 202, answer.text
    [call] = prefect.calls
    assert call["deployment"] == "certify/smollm2-135m-demo-cpu"
    assert call["parameters"] == {"model_version": "2", "model_location": "/models/smollm2/v2"}
    assert "ci-1" in call["idempotency_key"] and "webhook" in call["tags"]
    assert answer.json()["flow_run_ids"] == [str(uuid.uuid5(uuid.NAMESPACE_URL, call["idempotency_key"]))]


def test_without_a_location_only_the_version_is_passed(tmp_path):
    prefect = FakePrefect()
    assert post(make_client(tmp_path, prefect), event(location=None)).status_code == 202
    assert prefect.calls[0]["parameters"] == {"model_version": "2"}


@pytest.mark.parametrize("how", ["wrong secret", "other body", "missing", "garbage", "no timestamp"])
def test_bad_or_missing_signature_is_401_and_starts_nothing(tmp_path, how):
    prefect = FakePrefect()
    client = make_client(tmp_path, prefect)
    raw = json.dumps(event()).encode()
    if how == "wrong secret":
        answer = post(client, raw, secret=b"another-secret-0123456789")
    elif how == "other body":
        answer = post(client, raw, signature=webhook.sign(SECRET, NOW, raw.replace(b'"2"', b'"3"')))
    elif how == "garbage":
        answer = post(client, raw, signature="sha256=" + "g" * 64)
    else:
        headers = {webhook.TIMESTAMP_HEADER: str(NOW)} if how == "missing" else \
            {webhook.SIGNATURE_HEADER: webhook.sign(SECRET, NOW, raw)}
        answer = client.post(webhook.PATH, content=raw, headers=headers)
    assert answer.status_code == 401, answer.text
    assert prefect.calls == []


@pytest.mark.parametrize("offset, status", [(-301, 401), (301, 401), (-299, 202), (299, 202)])
def test_timestamp_must_be_within_the_tolerance(tmp_path, offset, status):
    """The timestamp is signed, so a captured request cannot be replayed later with a fresh one."""
    prefect = FakePrefect()
    answer = post(make_client(tmp_path, prefect), event(), timestamp=NOW + offset)
    assert answer.status_code == status, answer.text
    assert len(prefect.calls) == (status == 202)
    if status == 401:
        assert "timestamp" in answer.json()["error"]


@pytest.mark.parametrize("body, field", [
    (b"{not json", "(body)"),
    (b"[1, 2]", "(body)"),
    (event(version=None), "version"),
    ({k: v for k, v in event().items() if k != "model"}, "model"),
    (event(delivery_id="has spaces/and slashes"), "delivery_id"),
    (event(version=""), "version"),
    (event(modle="typo"), "modle"),
])
def test_malformed_or_invalid_json_is_400_naming_the_field(tmp_path, body, field):
    prefect = FakePrefect()
    answer = post(make_client(tmp_path, prefect), body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == field and field in answer.json()["error"]
    assert prefect.calls == []


def test_oversize_body_is_413_before_anything_else(tmp_path):
    prefect = FakePrefect()
    client = make_client(tmp_path, prefect, max_bytes=256)
    answer = post(client, event(version="x" * 300))
    assert answer.status_code == 413
    assert post(client, b"x" * 10_000, signature="sha256=00").status_code == 413  # unsigned and huge: still 413
    assert prefect.calls == []


def test_unknown_model_is_404(tmp_path):
    prefect = FakePrefect()
    answer = post(make_client(tmp_path, prefect), event(model="llama-9000"))
    assert answer.status_code == 404
    assert answer.json()["known_models"] == ["smollm2-135m"]
    assert prefect.calls == []


def test_a_replayed_delivery_starts_no_second_run_even_after_a_restart(tmp_path):
    prefect = FakePrefect()
    first = post(make_client(tmp_path, prefect), event())
    again = post(make_client(tmp_path, prefect), event(), timestamp=NOW + 60)  # a new app on the same database
    assert first.status_code == 202 and again.status_code == 200, again.text
    assert again.json()["status"] == "already handled"
    assert again.json()["flow_run_ids"] == first.json()["flow_run_ids"]
    assert len(prefect.calls) == 1
    assert post(make_client(tmp_path, prefect), event(delivery_id="ci-2")).status_code == 202
    assert len(prefect.calls) == 2


def test_when_prefect_refuses_the_answer_is_502_and_a_retry_runs(tmp_path):
    assert post(make_client(tmp_path, FakePrefect(fail=True)), event()).status_code == 502
    prefect = FakePrefect()
    assert post(make_client(tmp_path, prefect), event()).status_code == 202
    assert len(prefect.calls) == 1


def test_logs_never_show_the_secret_or_the_signature(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    client = make_client(tmp_path)
    raw = json.dumps(event()).encode()
    signature = webhook.sign(SECRET, NOW, raw)
    post(client, raw)
    post(client, raw, signature=signature[:-4] + "0000")
    post(client, raw, timestamp=NOW - 1000)
    text = caplog.text
    assert "rejected" in text
    assert SECRET.decode() not in text and signature.removeprefix("sha256=")[:16] not in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_the_documented_openssl_recipe_computes_an_accepted_signature(tmp_path):
    """The README's curl example signs with: printf '%s.%s' "$ts" "$body" | openssl dgst -sha256 -hmac "$secret"."""
    raw = json.dumps(event())
    out = subprocess.run(["sh", "-c", 'printf "%s.%s" "$TS" "$BODY" | openssl dgst -sha256 -hmac "$SECRET" | '
                                      "awk '{print $NF}'"],
                         env={"TS": str(NOW), "BODY": raw, "SECRET": SECRET.decode(), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert post(make_client(tmp_path), raw.encode(), signature=f"sha256={out}").status_code == 202


def test_settings_need_a_real_secret(monkeypatch):
    monkeypatch.delenv("ENGINEWRIGHT_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ValueError, match="ENGINEWRIGHT_WEBHOOK_SECRET"):
        webhook.Settings.from_env()
    monkeypatch.setenv("ENGINEWRIGHT_WEBHOOK_SECRET", "short")
    with pytest.raises(ValueError, match="at least 16"):
        webhook.Settings.from_env()


# The routes: which deployments follow a model, from prefect.yaml and its recipes.

def test_the_project_prefect_yaml_routes_the_demo_model_to_its_cpu_deployment():
    plan = load_plan()
    [demo] = [d for d in plan.deployments if d.entry == "smollm2-135m-demo"]
    assert demo.full_name == "certify/smollm2-135m-demo-cpu" and demo.pool == "cpu" and demo.targets == ["local"]
    assert demo.parameters == {"recipe_path": "recipes/demo.yaml", "targets": ["local"]}
    assert demo.schedules[0]["cron"] == "0 3 * * *"
    pools = {name: pool.gpu for name, pool in plan.pools.items()}
    assert {"cpu": "none", "gpu-h100": "H100", "gpu-b200": "B200"}.items() <= pools.items()
    assert demo in plan.by_model()["smollm2-135m"]


def _prefect_yaml(tmp_path: Path, targets: list[dict], **entry) -> Path:
    recipe = Path("recipes/demo.yaml").resolve().read_text()
    recipe = recipe.split("targets:")[0] + "targets:\n" + "".join(f"  - {json.dumps(t)}\n" for t in targets) + \
        "evaluation:" + recipe.split("evaluation:")[1]
    (tmp_path / "recipe.yaml").write_text(recipe)
    config = {"enginewright": {"default_pool": "cpu", "work_pools": {
        "cpu": {"gpu": "none"}, "gpu-h100": {"gpu": "H100"}, "gpu-b200": {"gpu": "sm_100"}}},
        "deployments": [{"name": "multi", "parameters": {"recipe_path": str(tmp_path / "recipe.yaml")},
                         "schedules": [{"cron": "0 1 * * *"}], **entry}]}
    (tmp_path / "prefect.yaml").write_text(json.dumps(config))
    return tmp_path / "prefect.yaml"


def test_targets_are_routed_to_the_pool_of_their_gpu(tmp_path):
    path = _prefect_yaml(tmp_path, [{"name": "local", "gpu": "auto"},
                                    {"name": "h100", "gpu": "H100", "backend": "trtllm", "work_pool": "gpu-h100"},
                                    {"name": "b200", "gpu": "B200", "backend": "trtllm", "work_pool": "gpu-b200"},
                                    {"name": "h200", "gpu": "H200", "backend": "trtllm", "work_pool": "gpu-h100"}])
    plan = load_plan(path)
    assert {d.name: (d.pool, d.targets) for d in plan.deployments} == {
        "multi-cpu": ("cpu", ["local"]), "multi-gpu-h100": ("gpu-h100", ["h100", "h200"]),
        "multi-gpu-b200": ("gpu-b200", ["b200"])}
    assert all(d.parameters["targets"] == d.targets and "pool:" + d.pool in d.tags for d in plan.deployments)


@pytest.mark.parametrize("target, message", [
    ({"name": "h100", "gpu": "H100", "backend": "trtllm"}, "goes to the CPU pool"),
    ({"name": "h100", "gpu": "H100", "backend": "trtllm", "work_pool": "gpu-b200"}, "pool 'gpu-b200' has"),
    ({"name": "h100", "gpu": "H100", "backend": "trtllm", "work_pool": "gpu-h1000"}, "does not define"),
])
def test_a_target_on_a_pool_without_its_gpu_is_refused_at_deploy_time(tmp_path, target, message):
    with pytest.raises(DeployError, match=message):
        load_plan(_prefect_yaml(tmp_path, [target]))


def test_a_bad_schedule_is_refused(tmp_path):
    path = _prefect_yaml(tmp_path, [{"name": "local"}])
    config = json.loads(path.read_text())
    config["deployments"][0]["schedules"] = [{"cron": "0 1 * * *", "interval": 60}, {"cronn": "x"}]
    path.write_text(json.dumps(config))
    with pytest.raises(DeployError, match="exactly one of cron") as err:
        load_plan(path)
    assert "cronn" in str(err.value)


class IdempotentPrefect(FakePrefect):
    """Like the Prefect API: a second create with the same idempotency key returns the run made by the first."""

    def __init__(self):
        super().__init__()
        self.runs: dict[str, str] = {}

    async def __call__(self, deployment, parameters, idempotency_key, tags):
        await super().__call__(deployment, parameters, idempotency_key, tags)
        return self.runs.setdefault(idempotency_key, str(uuid.uuid4()))


def test_a_concurrent_duplicate_delivery_is_answered_200_without_a_prefect_call(tmp_path):
    release, entered = threading.Event(), threading.Event()

    class SlowPrefect(FakePrefect):
        async def __call__(self, *args):
            entered.set()
            while not release.is_set():  # the first delivery's Prefect call is still in flight
                await asyncio.sleep(0.01)
            return await super().__call__(*args)

    prefect = SlowPrefect()
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(answer=post(make_client(tmp_path, prefect), event())))
    thread.start()
    try:
        assert entered.wait(10)
        duplicate = post(make_client(tmp_path, prefect), event(), timestamp=NOW + 1)
    finally:
        release.set()
        thread.join(10)
    assert duplicate.status_code == 200 and duplicate.json()["status"] == "duplicate", duplicate.text
    assert first["answer"].status_code == 202 and len(prefect.calls) == 1
    again = post(make_client(tmp_path, prefect), event(), timestamp=NOW + 2)
    assert again.status_code == 200 and again.json()["flow_run_ids"] == first["answer"].json()["flow_run_ids"]
    assert len(prefect.calls) == 1


@pytest.mark.parametrize("run_was_created", [False, True], ids=["before-create", "after-create"])
def test_a_delivery_interrupted_before_it_was_confirmed_gets_its_run_on_retry(tmp_path, run_was_created):
    """The receiver was killed after recording the delivery and before recording its flow runs; its database says
    'started'. The CI system's retry (a new receiver on the same database) must get the run, exactly one."""
    prefect = IdempotentPrefect()
    killed = subprocess.run([sys.executable, "-c", KILLED_RECEIVER, str(tmp_path / "d.db"), json.dumps(event())],
                            cwd=ROOT)  # a receiver recorded the delivery, then was killed
    assert killed.returncode == 9
    if run_was_created:  # killed between Prefect creating the run and the receiver recording its id
        prefect.runs["webhook-ci-1-certify/smollm2-135m-demo-cpu"] = "run-made-before-the-kill"

    retry = post(make_client(tmp_path, prefect), event(), timestamp=NOW + 30)
    assert retry.status_code == 202, retry.text
    [run_id] = retry.json()["flow_run_ids"]
    assert list(prefect.runs.values()) == [run_id]  # one run in Prefect, the one the answer names
    assert run_id == "run-made-before-the-kill" or not run_was_created
    again = post(make_client(tmp_path, prefect), event(), timestamp=NOW + 60)
    assert again.status_code == 200 and again.json()["flow_run_ids"] == [run_id]
    assert len(prefect.calls) == 1  # handled now: the third delivery asks Prefect for nothing


@pytest.mark.parametrize("timestamp", ["9" * 5000, "¹²³", "１２３"])
def test_pathological_signed_timestamps_are_refused_not_a_server_error(tmp_path, timestamp):
    raw = json.dumps(event()).encode()
    wire = timestamp.encode()  # what a client sends; the receiver reads it back as latin-1 text
    headers = [(webhook.TIMESTAMP_HEADER.encode(), wire),
               (webhook.SIGNATURE_HEADER.encode(), webhook.sign(SECRET, wire.decode("latin-1"), raw).encode())]
    answer = make_client(tmp_path).post(webhook.PATH, content=raw, headers=headers)
    assert answer.status_code == 401 and "1 to 12 ASCII digits" in answer.json()["error"]


@pytest.mark.parametrize("body", [b'{"delivery_id": "ci-1", "model": "smollm2-135m", "version": ' + b"9" * 5000 + b"}",
                                  b"[" * 20000 + b"]" * 20000,
                                  b'{"a": ' * 20000 + b"1" + b"}" * 20000,
                                  b'{"version": "' + b"[" * 100 + b'", "delivery_id": "ci-1"}'])
def test_pathological_signed_bodies_are_400_not_500(tmp_path, body):
    prefect = FakePrefect()
    answer = post(make_client(tmp_path, prefect, max_bytes=256 * 1024), body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] in ("(body)", "model") and prefect.calls == []


def test_a_body_that_never_finishes_is_timed_out_with_408(tmp_path):
    import asyncio
    import time

    import httpx

    settings = webhook.Settings(secret=SECRET, max_bytes=4096, db_path=tmp_path / "d.db", body_timeout_s=0.5)
    app = webhook.create_app(ROUTES, settings, FakePrefect(), clock=lambda: NOW)

    async def trickle():
        yield b'{"delivery_id": '
        await asyncio.sleep(30)  # a client that holds the connection open
        yield b'"ci-1"}'

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hook") as client:
            return await client.post(webhook.PATH, content=trickle(), headers={
                webhook.TIMESTAMP_HEADER: str(NOW), webhook.SIGNATURE_HEADER: "sha256=00"})
    started = time.monotonic()
    answer = asyncio.run(go())
    assert answer.status_code == 408 and time.monotonic() - started < 5


def test_stalled_headers_are_closed_and_a_signed_delivery_gets_through_during_the_attack(tmp_path):
    """2,000 connections that send half a request's headers and stop (from 127.0.0.1) are all closed within 10 s;
    a signed delivery from another client (127.0.0.2) sent while they are open starts its run. Loopback only."""
    import asyncio
    import threading
    import time

    import httpx

    settings = webhook.Settings(secret=SECRET, max_bytes=4096, db_path=tmp_path / "d.db", header_timeout_s=2.0)
    prefect = FakePrefect()
    app = webhook.create_app(ROUTES, settings, prefect, clock=lambda: NOW)
    import uvicorn

    server = uvicorn.Server(webhook.uvicorn_config(app, settings, host="127.0.0.1", port=0, log_level="warning",
                                                   backlog=4096))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    port = server.servers[0].sockets[0].getsockname()[1]

    async def stall(results: list):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            results.append("refused")
            return
        writer.write(f"POST {webhook.PATH} HTTP/1.1\r\nHost: x\r\n".encode())
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(), timeout=12)  # b"" when the server closes it
            results.append("closed")
        except asyncio.TimeoutError:
            results.append("open")
        finally:
            writer.close()

    async def attack_and_deliver():
        results: list = []
        started = time.monotonic()
        attackers = [asyncio.create_task(stall(results)) for _ in range(2000)]
        await asyncio.sleep(0.5)  # the attack is under way
        raw = json.dumps(event(delivery_id="during-attack")).encode()
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            answer = await client.post(f"http://127.0.0.1:{port}{webhook.PATH}", content=raw, headers={
                webhook.TIMESTAMP_HEADER: str(NOW), webhook.SIGNATURE_HEADER: webhook.sign(SECRET, NOW, raw),
                "Content-Type": "application/json"})
        await asyncio.gather(*attackers)
        return answer, results, time.monotonic() - started

    try:
        answer, results, seconds = asyncio.run(attack_and_deliver())
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert answer.status_code == 202, answer.text
    assert [c["idempotency_key"] for c in prefect.calls] == ["webhook-during-attack-certify/smollm2-135m-demo-cpu"]
    assert results.count("closed") == 2000 and seconds < 10, (results.count("closed"), results.count("open"), seconds)
