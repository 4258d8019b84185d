"""Fixtures for real servers on loopback (helpers in servers.py): one PostgreSQL cluster per test session; a Prefect
server, an MLflow server and process workers per test module, each on a database of its own in that cluster."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import pytest
from servers import Postgres, Service, clean_env, postgres_bin, start_mlflow_server, start_prefect_server, start_worker

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    """A throw-away PostgreSQL cluster on a free loopback port; `.create_database(name)` -> its URL."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (make test installs it: Debian package postgresql)")
    cluster = Postgres(bin_dir).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    """Prefect's test harness (a temporary API on its own SQLite database) for one test module's in-process flows."""
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _serving(server: Service):
    """Yield a started server once its /health answers; stop it afterwards, whatever happened."""
    try:
        server.wait_http(f"{server.url}/health", timeout=180)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prefect_server(postgres, tmp_path_factory) -> Service:
    """A Prefect server on its own PostgreSQL database; `.url` is its API URL (…/api)."""
    yield from _serving(start_prefect_server(postgres, f"prefect_{next(_databases)}",
                                             tmp_path_factory.mktemp("prefect-server")))


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory) -> Service:
    """An MLflow tracking server on its own PostgreSQL database, serving artifacts from a temp dir; `.url`."""
    yield from _serving(start_mlflow_server(postgres, f"mlflow_{next(_databases)}",
                                            tmp_path_factory.mktemp("mlflow-server")))


@pytest.fixture()
def tiny_recipe(tmp_path) -> Callable[..., Path]:
    """tiny_recipe(name, model_dir, model_name="tiny", **sections) -> the path of a small fp8 recipe for a tiny HF
    model, written as YAML under tmp_path; `sections` replace its top-level sections (quantization, targets, ...)."""
    import yaml

    def write(name: str, model_dir, *, model_name: str = "tiny", **sections) -> Path:
        recipe = {
            "name": name, "model": {"source": "hf_dir", "path": str(model_dir), "name": model_name},
            "calibration": {"source": "pydoc_topics", "samples": 8, "max_tokens": 64},
            "quantization": {"formats": ["fp8"]},
            "targets": [{"name": "local"}],
            "evaluation": {"tasks": ["holdout_perplexity"], "limit": 4, "batch_size": 4, "max_length": 128},
            "latency": {"requests": 2, "warmup": 0, "input_tokens": 8, "output_tokens": 3},
            "gates": {"accuracy": {"tasks": {"holdout_perplexity": {"max_relative_increase": 5.0}}}},
            "registry": {"name": name}} | sections
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


@pytest.fixture(scope="module")
def worker(prefect_server, tmp_path_factory) -> Callable[..., Service]:
    """Start a Prefect process worker: worker(pool, env=None, *, cwd=None, name=None, limit=1) -> Service.

    Its environment is this process's without PREFECT_/MLFLOW_/ENGINEWRIGHT_ settings, plus PREFECT_API_URL of
    `prefect_server` and a PREFECT_HOME of its own, plus `env` (e.g. ENGINEWRIGHT_HOME, MLFLOW_TRACKING_URI).
    The pool is created (type process) if missing. Every worker started is stopped with the module.
    """
    logs = tmp_path_factory.mktemp("workers")
    started: list[Service] = []

    def start(pool: str, env: dict | None = None, *, cwd: Path | None = None, name: str | None = None,
              limit: int = 1) -> Service:
        name = name or f"worker-{pool}-{len(started) + 1}"
        base = clean_env(PREFECT_API_URL=prefect_server.url, PREFECT_HOME=str(logs / name / "prefect-home"))
        workdir = cwd or logs / name
        workdir.mkdir(parents=True, exist_ok=True)
        started.append(start_worker(pool, base | (env or {}), logs, cwd=workdir, name=name, limit=limit))
        return started[-1]

    try:
        yield start
    finally:
        for service in reversed(started):
            service.stop()
