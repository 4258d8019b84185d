"""Where the store lives: its root (``ENGINEWRIGHT_HOME``) and each stage's directory (the bottom of the store)."""

from __future__ import annotations

from pathlib import Path

from tasks.base.settings import settings

MANIFEST = "manifest.json"
# What else lives under the home and is no stage output: MLflow's artifact store (the registry's copies, checked
# against the registry on download), Prefect's state, downloads, logs, reports, locks.
NOT_STORE = ("mlartifacts", "prefect", "downloads", "logs", "reports", "locks")


def home() -> Path:
    """Where artifacts, the MLflow database and Prefect's state live (``ENGINEWRIGHT_HOME``, default
    ./.enginewright)."""
    return settings().home


def stage_dir(stage: str, key: str) -> Path:
    """A stage's output directory for one cache key: ``<home>/<stage>/<key[:24]>``."""
    return home() / stage / key[:24]
