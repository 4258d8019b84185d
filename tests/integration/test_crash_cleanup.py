"""A run killed with SIGKILL leaves its MLflow runs and Prefect flow run RUNNING, and Prefect's temporary server
running; `enginewright cleanup` (also run at the start of `enginewright run`) marks the runs failed and stops the
server, and leaves a live process's runs alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

DOOMED = """
import os, signal, sys
from pathlib import Path

from flows import env
env.configure(offline=True)
from prefect import flow, tags

from flows.cleanup import process_tags
from registry import tracking as registry
from registry import client as registry_client


@flow(name="doomed")
def doomed(recipe: str) -> None:
    run_id = registry.start_pipeline_run(experiment="crash", run_name="doomed", recipe_file=Path(recipe),
                                         recipe_digest="0", params={}, tags={})
    child = registry.start_child_run(run_id, run_name="doomed-child", params={}, tags={})
    print(run_id, child, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a `kill -9` would


with tags(*process_tags()):
    doomed(sys.argv[1])
"""

STATES = """
from flows import env
env.configure(offline=True)
from prefect import get_client
from prefect.client.schemas.sorting import FlowRunSort
with get_client(sync_client=True) as client:
    for run in client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC, limit=50):
        print(run.name, run.state.type.value)
"""


def python(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run Python on `home`; output through files, not pipes: a killed run's orphans would hold a pipe open."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env | {"ENGINEWRIGHT_HOME": str(home)},
                              stdout=out, stderr=err, text=True, timeout=300)
        out.seek(0), err.seek(0)
        done.stdout, done.stderr = out.read(), err.read()
    assert not check or done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def temporary_prefect_servers(home: Path) -> list[int]:
    servers = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"prefect.server.api.server:create_app" in (proc / "cmdline").read_bytes() and \
                    f"PREFECT_HOME={home / 'prefect'}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                servers.append(int(proc.name))
        except OSError:
            continue
    return servers


def test_cleanup_marks_the_runs_of_a_killed_process_failed(isolated_home, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: crash\n")
    killed = python(isolated_home, "-c", DOOMED, str(recipe), check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_id, child_id = killed.stdout.split()
    [orphan] = temporary_prefect_servers(isolated_home)  # Prefect's temporary server outlived the killed run
    try:
        check_cleanup(isolated_home, recipe, run_id, child_id, orphan)
    finally:
        for pid in temporary_prefect_servers(isolated_home):
            os.kill(pid, signal.SIGKILL)


def check_cleanup(isolated_home: Path, recipe: Path, run_id: str, child_id: str, orphan: int) -> None:
    from registry import client as registry_client
    from registry import tracking as registry

    alive = registry.start_pipeline_run(experiment="crash", run_name="alive", recipe_file=recipe, recipe_digest="0",
                                        params={}, tags={})  # this test's process: still running
    client = registry_client.client()
    assert client.get_run(run_id).info.status == "RUNNING"

    cleaned = python(isolated_home, "-m", "flows.cli", "cleanup")
    assert "2 MLflow run(s), 1 Prefect flow run(s) marked, 1 orphaned temporary server(s) stopped" in \
        cleaned.stdout, cleaned.stdout
    deadline = time.monotonic() + 20
    while orphan in temporary_prefect_servers(isolated_home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert orphan not in temporary_prefect_servers(isolated_home)
    for rid in (run_id, child_id):
        run = client.get_run(rid)
        assert run.info.status == "FAILED" and "is gone" in run.data.tags["enginewright.abandoned"]
    assert client.get_run(alive).info.status == "RUNNING"
    states = python(isolated_home, "-c", STATES).stdout
    assert states.split()[1:] == ["CRASHED"], states

    registry.end_run(alive)
