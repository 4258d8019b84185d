"""Real servers for integration tests, on loopback: a throw-away PostgreSQL cluster, Prefect and MLflow servers on it,
and Prefect process workers. Installs nothing: PostgreSQL comes from Debian's `postgresql` package (make test
installs it), Prefect and MLflow from the venv. The fixtures in conftest.py wrap these.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def clean_env(**extra: str) -> dict:
    """This process's environment without Prefect, MLflow or enginewright settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ENGINEWRIGHT_"))}
    return env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | extra


class Service:
    """A server process of a test, in its own process group (so its children stop with it), logging to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict, logs: Path, cwd: Path = ROOT):
        logs.mkdir(parents=True, exist_ok=True)
        self.name, self.log, self.env = name, logs / f"{name}.log", env
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(url, timeout=5, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{self.name} not answering {url} after {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def postgres_bin() -> Path | None:
    return next((d for d in PG_BIN_DIRS if (d / "initdb").is_file()), None)


@dataclass
class Postgres:
    """A throw-away cluster on 127.0.0.1:`port`, trust authentication for loopback, superuser `postgres`.

    As root it runs as `nobody` (PostgreSQL refuses root); the data directory is a fresh one under /tmp (pytest's
    tmp dirs are closed to other users) owned by that user, removed by stop().
    """
    bin_dir: Path
    port: int = field(default_factory=free_port)
    user: str = "postgres"
    data: Path = field(init=False)

    def _as_owner(self, *cmd) -> list[str]:
        return ["runuser", "-u", "nobody", "--", *map(str, cmd)] if os.geteuid() == 0 else list(map(str, cmd))

    def _run(self, *cmd, as_owner: bool = True) -> None:
        done = subprocess.run(self._as_owner(*cmd) if as_owner else list(map(str, cmd)), capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(str(cmd[0])).name} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> "Postgres":
        self.root = Path(tempfile.mkdtemp(prefix="ew-postgres-"))
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        self.data = self.root / "data"
        self._run(self.bin_dir / "initdb", "-D", self.data, "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-o", options, "-l", self.root / "postgres.log", "-w",
                  "-t", "60", "start")
        return self

    def create_database(self, name: str) -> str:
        """Create database `name`; returns its SQLAlchemy URL without a driver (postgresql://...)."""
        self._run(self.bin_dir / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", self.user, name,
                  as_owner=False)
        return self.url(name)

    def url(self, database: str, driver: str = "") -> str:
        return f"postgresql{'+' + driver if driver else ''}://{self.user}@127.0.0.1:{self.port}/{database}"

    def log_tail(self, n: int = 3000) -> str:
        return (self.root / "postgres.log").read_text(errors="replace")[-n:]

    def stop(self) -> None:
        try:
            self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_prefect_server(postgres: Postgres, database: str, workdir: Path, **env: str) -> Service:
    """A Prefect server on `database` (created here) with its own PREFECT_HOME; `.url` is its API URL.
    Its scheduler looks every 5 s (default 60), so interval schedules fire within a test's patience."""
    url = postgres.create_database(database)
    port = free_port()
    server_env = clean_env(PREFECT_HOME=str(workdir / "prefect-home"), PREFECT_SERVER_UI_ENABLED="false",
                           PREFECT_API_DATABASE_CONNECTION_URL=url.replace("postgresql://", "postgresql+asyncpg://"),
                           PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5") | env
    service = Service("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                         str(port)], server_env, workdir)
    service.url = f"http://127.0.0.1:{port}/api"
    return service


def start_mlflow_server(postgres: Postgres, database: str, workdir: Path, **env: str) -> Service:
    """An MLflow tracking server on `database` (created here) proxying artifacts to workdir/mlartifacts; `.url`."""
    url = postgres.create_database(database)
    port = free_port()
    service = Service("mlflow-server", [str(BIN / "mlflow"), "server", "--backend-store-uri", url,
                                        "--artifacts-destination", str(workdir / "mlartifacts"), "--host",
                                        "127.0.0.1", "--port", str(port), "--workers", "1"], clean_env() | env,
                      workdir)
    service.url = f"http://127.0.0.1:{port}"
    return service


def start_worker(pool: str, env: dict, logs: Path, *, cwd: Path, name: str | None = None,
                 limit: int = 1) -> Service:
    """A Prefect process worker on `pool` (created if missing), polling every 2 s, with exactly `env`."""
    return Service(name or f"worker-{pool}", [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type",
                                              "process", "--limit", str(limit)],
                   env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}, logs, cwd)
