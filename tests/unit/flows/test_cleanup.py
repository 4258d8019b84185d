"""`enginewright cleanup` (flows/cleanup.py) stops only the servers this home's killed runs left: fake servers (sleeping
Python processes with the environment a real one inherits) of this home and of another one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from flows import cleanup
from tasks.host import liveness

SLEEPER = "import time; time.sleep(120)"


@pytest.fixture
def spawn():
    started = []

    def start(*, home, owner, extra_env=None, marker=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ENGINEWRIGHT_", "PREFECT_"))}
        env |= {"ENGINEWRIGHT_OWNER": owner, "ENGINEWRIGHT_HOME": str(home)} | (extra_env or {})
        proc = subprocess.Popen([sys.executable, "-c", SLEEPER, *([marker] if marker else [])], env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _dead_owner() -> str:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{socket.gethostname()}:{gone.stdout.strip()}:1"


def _wait_gone(proc, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc.poll() is not None


PREFECT = {"extra_env": {"PREFECT__SERVER_EPHEMERAL": "1"}, "marker": cleanup.PREFECT_SERVER_MARKER}


def test_cleanup_stops_this_homes_orphaned_servers_and_leaves_another_homes_alone(spawn, isolated_home, tmp_path):
    isolated_home.mkdir(parents=True, exist_ok=True)
    other = tmp_path / "other-home"
    dead = _dead_owner()
    ours_prefect = spawn(home=isolated_home, owner=dead, **PREFECT)
    ours_model = spawn(home=isolated_home, owner=dead, extra_env={"ENGINEWRIGHT_SERVER": "reference-server"})
    others_orphan = spawn(home=other, owner=dead, **PREFECT)
    others_model = spawn(home=other, owner=dead, extra_env={"ENGINEWRIGHT_SERVER": "reference-server"})
    others_live = spawn(home=other, owner=liveness.owner_token(), **PREFECT)  # its run is alive
    ours_live = spawn(home=isolated_home, owner=liveness.owner_token(), **PREFECT)  # a live run of this home
    not_a_server = spawn(home=isolated_home, owner=dead)  # some other helper: not cleanup's to stop
    deadline = time.monotonic() + 10
    while len([h for h in liveness.orphaned_helpers() if h["pid"] == ours_model.pid]) == 0 \
            and time.monotonic() < deadline:  # its environment readable once exec'd
        time.sleep(0.05)

    t = time.perf_counter()
    stopped = cleanup.stop_orphaned_servers()
    took = time.perf_counter() - t

    assert {s["pid"] for s in stopped} == {ours_prefect.pid, ours_model.pid}, stopped
    by_pid = {s["pid"]: s for s in stopped}
    assert by_pid[ours_prefect.pid]["what"] == "Prefect's temporary API server"
    assert by_pid[ours_model.pid]["what"] == "model server reference-server"
    assert all(s["home"] == str(isolated_home.resolve()) and "is gone" in s["reason"] for s in stopped)
    assert _wait_gone(ours_prefect) and _wait_gone(ours_model)
    time.sleep(0.2)
    for proc in (others_orphan, others_model, others_live, ours_live, not_a_server):
        assert proc.poll() is None, proc.args
    assert took < 2.0, f"stopping servers took {took:.2f} s"


def test_a_relative_home_is_taken_from_the_processs_working_directory(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], cwd=tmp_path)
    try:
        assert liveness.home_of({"ENGINEWRIGHT_HOME": "state"}, proc.pid) == str((tmp_path / "state").resolve())
        assert liveness.home_of({}, proc.pid) == str((tmp_path / ".enginewright").resolve())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
