"""A deployment's interval schedule fires on its own: the Prefect server's scheduler creates flow runs (on
PostgreSQL, as in production) and a process worker runs one to completion; nobody triggers anything."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.integration

TICK = '''from prefect import flow


@flow(name="tick")
def tick() -> str:
    from flows.prefect_edge import tag_scheduled_run

    tag_scheduled_run()  # what the certify flow does first: a scheduled run tags itself with the schedule's slug
    return "tock"
'''


def api(server, method: str, path: str, **kwargs):
    answer = httpx.request(method, server.url + path, timeout=30, trust_env=False, **kwargs)
    assert answer.status_code < 300, f"{method} {path}: {answer.status_code} {answer.text}"
    return answer.json()


def test_an_interval_schedule_creates_a_run_that_a_worker_completes(prefect_server, worker, tmp_path):
    (tmp_path / "tick.py").write_text(TICK)
    api(prefect_server, "POST", "/work_pools/", json={"name": "ticks", "type": "process"})
    flow_id = api(prefect_server, "POST", "/flows/", json={"name": "tick"})["id"]
    deployment = api(prefect_server, "POST", "/deployments/", json={
        "name": "every-5s", "flow_id": flow_id, "work_pool_name": "ticks", "entrypoint": "tick.py:tick",
        "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}],
        "schedules": [{"schedule": {"interval": 5}, "active": True, "slug": "every-5s"}]})
    tick_worker = worker("ticks")

    deadline = time.monotonic() + 120
    runs: list[dict] = []
    while time.monotonic() < deadline:
        runs = api(prefect_server, "POST", "/flow_runs/filter",
                   json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
        if any(r["state_type"] == "COMPLETED" for r in runs):
            break
        time.sleep(2)
    done = [r for r in runs if r["state_type"] == "COMPLETED"]
    assert done, (f"no completed run of the scheduled deployment after 120 s; runs: "
                  f"{[(r['name'], r['state_type']) for r in runs]}\nserver log:\n{prefect_server.tail()}\n"
                  f"worker log:\n{tick_worker.tail()}")
    assert "auto-scheduled" in done[0]["tags"]  # made by the scheduler, not by a person or the API
    tags = api(prefect_server, "GET", f"/flow_runs/{done[0]['id']}")["tags"]
    assert {"scheduled", "every-5s"} <= set(tags), tags  # deployment tags would go on manual runs too
    assert done[0]["work_pool_name"] == "ticks"
