"""What the certify flow shows in Prefect and how its flow run and its MLflow run point at each other.

Every function is a no-op outside a flow run (e.g. the flow function called with `.fn()` in a test).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("enginewright")


def flow_run_name() -> str:
    """'<recipe file stem> <model version>' (e.g. 'demo 2', 'demo unversioned'), plus 'dry-run' for a plan."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    name = f"{Path(params.get('recipe_path') or 'recipe').stem} {params.get('model_version') or 'unversioned'}"
    return name + (" dry-run" if params.get("dry_run") else "")


def artifact_key(recipe_name: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes; one key per recipe, so recipes do not
    overwrite each other's latest artifact."""
    slug = re.sub(r"[^a-z0-9-]+", "-", recipe_name.lower()).strip("-") or "recipe"
    return f"{slug}-{what}"


def _context():
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.flow_run if ctx is not None and ctx.flow_run is not None else None


def mlflow_tags() -> dict:
    """The Prefect flow run as MLflow run tags (id, name, deployment, UI link)."""
    from prefect.runtime import deployment, flow_run

    if _context() is None:
        return {}
    return {k: v for k, v in {"prefect.flow_run_id": flow_run.id, "prefect.flow_run_name": flow_run.name,
                              "prefect.deployment": deployment.name,
                              "prefect.flow_run_url": flow_run_url(flow_run.id)}.items() if v}


def flow_run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page, from the configured Prefect URL (Prefect's own `ui_url` is `None/...` when only the
    temporary local API ran): the server's UI, or where the printed `prefect server start` serves this store."""
    from flows.env import prefect_ui_url

    return f"{prefect_ui_url()}/runs/flow-run/{flow_run_id}" if flow_run_id else None


def trigger_tags(created_by) -> list[str]:
    """Tags for how the run started: a run made by a deployment schedule gets the schedule's slug (e.g. 'nightly').
    Deployment tags go on every run (manual, webhook, scheduled), so schedule-specific tags cannot live there."""
    if created_by is not None and str(getattr(created_by, "type", "")).upper() == "SCHEDULE":
        return [t for t in ("scheduled", getattr(created_by, "display_value", None)) if t]
    return []


def tag_scheduled_run() -> None:
    from prefect.client.orchestration import get_client

    run = _context()
    extra = trigger_tags(getattr(run, "created_by", None)) if run is not None else []
    if not extra:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=sorted({*run.tags, *extra}))


def publish_mlflow_link(recipe_name: str, url: str, run_name: str) -> None:
    from prefect.artifacts import create_link_artifact

    if _context() is None:
        return
    create_link_artifact(link=url, link_text=f"MLflow run {run_name}", key=artifact_key(recipe_name, "mlflow-run"),
                         description="this flow run's MLflow run (metrics, nested runs per format and target, "
                                     "artifacts, registry versions)")


def publish_plan(recipe_name: str, pairs: list[dict]) -> None:
    """The dry-run plan as a table artifact: what a UI 'dry_run' shows."""
    from prefect.artifacts import create_table_artifact

    if _context() is None:
        return
    create_table_artifact(table=pairs, key=artifact_key(recipe_name, "plan"),
                          description="dry run: every (format, target) pair, each skipped one with its reason")
