"""Telling a run's process is gone (tasks/host/liveness.py): what cleanup relies on to never fail a live run."""

import socket
import subprocess
import sys

from tasks.host import liveness


def test_this_process_is_alive_and_a_finished_one_is_gone():
    me = liveness.identity()
    assert liveness.gone(me["host"], me["pid"], me["started"]) is None
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert "is gone" in liveness.gone(me["host"], finished.stdout.strip())


def test_a_reused_pid_is_not_taken_for_the_runs_process():
    me = liveness.identity()
    assert "another process" in liveness.gone(me["host"], me["pid"], str(int(me["started"]) - 1))


def test_another_hosts_process_is_never_judged():
    assert liveness.gone(socket.gethostname() + "-elsewhere", "999999999") is None
