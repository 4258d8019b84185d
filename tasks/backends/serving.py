"""Start a model server as a subprocess, wait until it is healthy, stop it afterwards; its log is kept.

Shared by every backend's `serve()`. The server gets its own process group, so workers it forks (trtllm-serve's MPI
ranks) are stopped with it, also when the server itself already died. It also must not outlive the process that
started it: a run killed mid-latency (SIGKILL, OOM) cannot stop it, so the kernel does (Linux PR_SET_PDEATHSIG: the
server gets SIGTERM when its parent dies; SIGTERM lets trtllm-serve stop its own workers).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

from tasks.base.settings import SERVER

log = logging.getLogger(__name__)


# Runs in the server's process, then execs the server (exec keeps the death signal): SIGTERM when the parent dies,
# and exit at once if it died before prctl. No preexec_fn: that is unsafe in a process with threads (Prefect's).
_DIE_WITH_PARENT = """import ctypes, os, signal, sys
if sys.platform == "linux":
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[1]):
        sys.exit(f"parent {sys.argv[1]} is gone; not starting {sys.argv[2]}")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def dies_with_parent(cmd: list[str], env: dict | None = None) -> list[str]:
    """`cmd` wrapped so that it is stopped when this process dies. The executable is looked up here first, so a
    missing one raises FileNotFoundError in this process as a plain Popen would."""
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    if shutil.which(cmd[0], path=path) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cmd[0])
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(log_file: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(process: subprocess.Popen, health_url: str, log_file: Path, timeout_s: float, *, name: str,
                 error: type[Exception] = ServerFailed, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        code = process.poll()
        if code is not None:
            raise error(f"{name} exited with code {code} before {health_url} answered 200; "
                        f"last lines of {log_file}:\n{tail(log_file)}")
        try:
            if httpx.get(health_url, timeout=2.0, trust_env=False).status_code == 200:  # no proxy for loopback
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise error(f"{name} did not answer 200 on {health_url} within {timeout_s:.0f} s; "
                        f"last lines of {log_file}:\n{tail(log_file)}")
        time.sleep(poll_s)


def stop(process: subprocess.Popen, *, name: str, grace_s: float = 20.0) -> None:
    """SIGTERM to the server's process group, then SIGKILL if it is still there after `grace_s`.

    A server that already died is followed by SIGKILL to its group: workers it left behind are ours too.
    """
    def signal_group(sig):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)

    if process.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, process.pid, grace_s)
    signal_group(signal.SIGKILL)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.error("%s (pid %d) is still running after SIGKILL; stop it by hand", name, process.pid)


@contextlib.contextmanager
def run_server(cmd: list[str], *, health_url: str, log_file: Path, timeout_s: float = 300, env: dict | None = None,
               name: str | None = None, error: type[Exception] = ServerFailed,
               stop_grace_s: float = 20.0, poll_s: float = 0.5) -> Iterator[subprocess.Popen]:
    name = name or Path(cmd[0]).name
    # What it is, for `enginewright cleanup` should it outlive a killed run (it inherits ENGINEWRIGHT_OWNER/_HOME)
    env = dict(os.environ if env is None else env) | {SERVER: name}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as logf:
        logf.write(f"$ {shlex.join(cmd)}\n".encode())
        logf.flush()
        process = subprocess.Popen(dies_with_parent(cmd, env), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        wait_healthy(process, health_url, log_file, timeout_s, name=name, error=error, poll_s=poll_s)
        yield process
    finally:
        stop(process, name=name, grace_s=stop_grace_s)
