"""The MLflow connection: tracking URI, client (with the SQLite schema guard), experiments, and how values are
written as tags (the bottom of registry/; it imports nothing of it).

Tracking URI: ``MLFLOW_TRACKING_URI`` if set (e.g. ``http://mlflow:5000``), else a SQLite file in the store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks import store
from tasks.base.settings import settings


def tracking_uri() -> str:
    return settings().mlflow_tracking_uri or f"sqlite:///{store.home() / 'mlflow.db'}"


_ready: set[str] = set()


def client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:") and uri not in _ready:
        # Creating or migrating the SQLite schema is not safe when two runs start at once: one does it, others wait.
        with store.lock(store.home() / "locks" / "mlflow-db"):
            MlflowClient(uri).search_experiments(max_results=1)
        _ready.add(uri)
    return MlflowClient(uri)


def ui_url() -> str:
    """Where the MLflow UI is: the tracking server, or where `ui_command` serves the local store."""
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else settings().mlflow_ui_url


def ui_command() -> str:
    """A command that serves this store's MLflow UI at `ui_url()`, as printed (absolute paths, its own port)."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:"):
        return f"open {uri}"
    url = urlsplit(ui_url())
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    return (f"{mlflow_bin} ui --backend-store-uri {uri} --host {url.hostname} --port {url.port or 80}"
            f"   # then open {ui_url()}/#/experiments{UI_QUERY}")


# The experiment tag MLflow's UI reads to choose an experiment's kind (MLflow 3.17: mlflow/assistant/skills/
# mlflow-onboarding/SKILL.md "Check the Experiment Type Tag"; the UI's enum in server/js/build/static/js/main.*.js:
# GENAI_DEVELOPMENT="genai_development", CUSTOM_MODEL_DEVELOPMENT="custom_model_development"). Unset, 3.17 opens on
# an empty GenAI traces view and hides the Model Registry; this kind opens on the runs table.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# Seen in headless Chromium on 3.17.2: with a fresh browser profile the UI's GenAI / "Model training" toggle
# (localStorage `mlflow.workflowType`, default genai) overrides the tag; a link's `workflowType` parameter sets it.
UI_QUERY = "?workflowType=machine_learning"


def experiment_id(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # created before the kind was set: set it once
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None if not tracking_uri().startswith("sqlite:") else (store.home() / "mlartifacts").as_uri()
    try:
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def code_version() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


# MLflow gives these no exception classes of their own; what each helper reads was observed on MLflow 3.17.
def already_exists(exc: MlflowException) -> bool:
    """A create that lost a race: error code RESOURCE_ALREADY_EXISTS (tracking server and SQLite alike)."""
    return exc.error_code == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(exc).lower()


def unique_key_collision(exc: MlflowException) -> bool:
    """Two check-then-insert writers collided on a unique key: SQLite says "UNIQUE constraint", PostgreSQL
    "duplicate key" (MLflow passes the database's message on as an INTERNAL_ERROR)."""
    return "UNIQUE constraint" in str(exc) or "duplicate key" in str(exc)
