"""Embedded defaults, set before Prefect, MLflow or Hugging Face libraries are imported (they read env at import)."""

from __future__ import annotations

import os

from tasks import store
from tasks.base import settings as names
from tasks.base.settings import settings
from tasks.host import liveness


def configure(*, offline: bool) -> None:
    """Keep every piece of state under ENGINEWRIGHT_HOME unless the user pointed somewhere else.

    Args:
        offline: no stage of the recipe needs the Hugging Face hub; make hub libraries fail fast instead of
            trying the network.
    """
    home = store.home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ[names.HOME] = str(home)  # absolute: what this process starts names its home (cleanup compares it)
    os.environ[names.OWNER] = liveness.owner_token()  # so `enginewright cleanup` can tell our orphans
    if not settings().prefect_api_url:
        os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from laptops/CI
    for key, value in flow_run_env(offline=offline).items():
        os.environ.setdefault(key, value)


def flow_run_env(*, offline: bool) -> dict[str, str]:
    """What every flow run's process needs, wherever it runs: `enginewright run` sets these in its own process;
    deployments (flows/deploy.py) pass them to workers as the job's environment."""
    env = {"PREFECT_LOGGING_EXTRA_LOGGERS": "enginewright,tasks,registry", "TOKENIZERS_PARALLELISM": "false",
           "HF_UPDATE_DOWNLOAD_COUNTS": "0", "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
           "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    if offline:
        env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return env


def recipe_needs_hub(recipe) -> bool:
    from recipes.schema import LOCAL_EVAL_TASKS

    return (recipe.model.source == "hub" or recipe.calibration.source == "hub"
            or any(t not in LOCAL_EVAL_TASKS for t in recipe.evaluation.tasks))


def prefect_ui_url() -> str:
    """Where the Prefect UI is: the configured server's, else where `prefect_ui_command` serves the local one."""
    api = settings().prefect_api_url
    return api.rstrip("/").removesuffix("/api") if api else settings().prefect_ui_url


def prefect_ui_command() -> str:
    """A command that serves this store's Prefect UI at `prefect_ui_url()`, as printed. A server on a port other
    than 4200 needs its UI told where its API is (PREFECT_UI_API_URL) and the port (PREFECT_SERVER_API_PORT):
    `prefect server start --port N` alone serves a UI that calls port 4200."""
    import sys
    from urllib.parse import urlsplit

    if settings().prefect_api_url:
        return f"open {prefect_ui_url()}"
    url = urlsplit(prefect_ui_url())
    port = url.port or 80
    prefect_bin = os.path.join(os.path.dirname(sys.executable), "prefect")
    return (f"PREFECT_HOME={store.home() / 'prefect'} PREFECT_SERVER_API_HOST={url.hostname} "
            f"PREFECT_SERVER_API_PORT={port} PREFECT_UI_API_URL={prefect_ui_url()}/api "
            f"{prefect_bin} server start --host {url.hostname} --port {port}   # then open {prefect_ui_url()}")
