"""Start a model server as a subprocess, wait until it is healthy, stop it afterwards; its log is kept."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log_file: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def run_server(cmd: list[str], *, health_url: str, log_file: Path, timeout_s: float = 300,
               env: dict | None = None) -> Iterator[subprocess.Popen]:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise ServerFailed(f"server exited with code {proc.returncode}: {' '.join(cmd)}\n{_tail(log_file)}")
            try:
                if httpx.get(health_url, timeout=2, trust_env=False).status_code == 200:  # no proxy for loopback
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"server not healthy at {health_url} after {timeout_s:.0f} s\n{_tail(log_file)}")
            time.sleep(0.5)
        yield proc
    finally:  # the whole process group: servers that fork workers leave none behind
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
