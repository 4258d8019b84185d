"""Every ``ENGINEWRIGHT_*`` variable, named once, and read in one place (:meth:`Settings.from_env`).

Read at call time, not import time: the CLI sets ``ENGINEWRIGHT_HOME`` (flows/env.py) after modules are imported,
and tests set variables per test. The writers of deployment variables (flows/deploy.py) use the same names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

HOME = "ENGINEWRIGHT_HOME"
OWNER = "ENGINEWRIGHT_OWNER"
SERVER = "ENGINEWRIGHT_SERVER"  # set in a model server's environment (tasks/backends/serving.py): what it is
SHARE_ARTIFACTS = "ENGINEWRIGHT_SHARE_ARTIFACTS"
PROJECT_DIR = "ENGINEWRIGHT_PROJECT_DIR"
WORK_POOL = "ENGINEWRIGHT_WORK_POOL"
QUANTIZE_DEPLOYMENT = "ENGINEWRIGHT_QUANTIZE_DEPLOYMENT"
QUANTIZE_POOL = "ENGINEWRIGHT_QUANTIZE_POOL"
WEBHOOK_SECRET = "ENGINEWRIGHT_WEBHOOK_SECRET"
WEBHOOK_DB = "ENGINEWRIGHT_WEBHOOK_DB"
WEBHOOK_TOLERANCE_S = "ENGINEWRIGHT_WEBHOOK_TOLERANCE_S"
WEBHOOK_MAX_BYTES = "ENGINEWRIGHT_WEBHOOK_MAX_BYTES"
WEBHOOK_BODY_TIMEOUT_S = "ENGINEWRIGHT_WEBHOOK_BODY_TIMEOUT_S"
VLLM_PYTHON = "ENGINEWRIGHT_VLLM_PYTHON"
# Where the local UIs are served when no server is configured (the printed `mlflow ui` / `prefect server start`
# commands and every link use these); defaults clear of the compose stack's 5000 and 4200.
MLFLOW_UI_URL = "ENGINEWRIGHT_MLFLOW_UI_URL"
PREFECT_UI_URL = "ENGINEWRIGHT_PREFECT_UI_URL"
# Not ours, but read here too so that no other module reads the environment for them.
MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"
PREFECT_API_URL = "PREFECT_API_URL"
PREFECT_HOME = "PREFECT_HOME"
PREFECT_DATABASE_URL = "PREFECT_API_DATABASE_CONNECTION_URL"


@dataclass(frozen=True)
class Settings:
    home: Path
    owner: str
    share_artifacts: str  # auto | 0 | 1
    project_dir: str | None
    work_pool: str | None
    quantize_deployment: str | None
    quantize_pool: str | None
    webhook_secret: str
    webhook_db: str | None
    webhook_tolerance_s: int
    webhook_max_bytes: int
    webhook_body_timeout_s: float
    vllm_python: str | None
    mlflow_tracking_uri: str | None
    prefect_api_url: str | None
    mlflow_ui_url: str = "http://127.0.0.1:5050"
    prefect_ui_url: str = "http://127.0.0.1:4250"
    prefect_home: str | None = None
    prefect_database_url: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            home=Path(env.get(HOME, ".enginewright")).resolve(),
            owner=env.get(OWNER, ""),
            share_artifacts=env.get(SHARE_ARTIFACTS, "auto").lower(),
            project_dir=env.get(PROJECT_DIR) or None,
            work_pool=env.get(WORK_POOL) or None,
            quantize_deployment=env.get(QUANTIZE_DEPLOYMENT) or None,
            quantize_pool=env.get(QUANTIZE_POOL) or None,
            webhook_secret=env.get(WEBHOOK_SECRET, ""),
            webhook_db=env.get(WEBHOOK_DB) or None,
            webhook_tolerance_s=int(env.get(WEBHOOK_TOLERANCE_S, 300)),
            webhook_max_bytes=int(env.get(WEBHOOK_MAX_BYTES, 64 * 1024)),
            webhook_body_timeout_s=float(env.get(WEBHOOK_BODY_TIMEOUT_S, 10)),
            vllm_python=env.get(VLLM_PYTHON) or None,
            mlflow_tracking_uri=env.get(MLFLOW_TRACKING_URI) or None,
            prefect_api_url=env.get(PREFECT_API_URL) or None,
            mlflow_ui_url=(env.get(MLFLOW_UI_URL) or "http://127.0.0.1:5050").rstrip("/"),
            prefect_ui_url=(env.get(PREFECT_UI_URL) or "http://127.0.0.1:4250").rstrip("/"),
            prefect_home=env.get(PREFECT_HOME) or None,
            prefect_database_url=env.get(PREFECT_DATABASE_URL) or None,
        )


def settings() -> Settings:
    """The settings as the environment says now."""
    return Settings.from_env()
