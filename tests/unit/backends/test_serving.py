"""The model server helper (tasks/backends/serving.py): a server never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.backends.serving import run_server

ROOT = Path(__file__).resolve().parents[3]

PARENT = """
import sys, time
from pathlib import Path
from tasks.backends.serving import free_port, run_server

port = free_port()
cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
with run_server(cmd, health_url=f"http://127.0.0.1:{port}/", log_file=Path(sys.argv[1]), name="http") as server:
    print(port, server.pid, flush=True)
    time.sleep(600)
"""


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux")
def test_the_server_stops_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "server.log")], cwd=ROOT,
                              env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    port, server_pid = map(int, parent.stdout.readline().split())
    try:
        assert listening(port)
        parent.kill()  # SIGKILL: no finally, no atexit in the parent
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while listening(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not listening(port), f"the server (pid {server_pid}) outlived its killed parent on port {port}"
    finally:
        try:
            os.killpg(server_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_missing_server_executable_is_reported_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-server"):
        with run_server(["no-such-server", "--port", "1"], health_url="http://127.0.0.1:1/", log_file=tmp_path / "l"):
            pass
