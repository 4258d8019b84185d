"""What a certify run shows people: the decision report and the calibration report, logged to the MLflow run and
published as Prefect artifacts (the Prefect UI cannot fetch local files, so images are embedded)."""

from __future__ import annotations

from flows import prefect_edge as edge
from registry import tracking as registry
from tasks import store


def report(recipe, record) -> None:
    """The decision report: written to the store, logged to the MLflow run, shown as a Prefect artifact."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.decisions.report import inline_images, write_report

    if not any(r["status"] != "skipped" for r in record.rows):
        return
    out = write_report(recipe=recipe, rows=record.rows, decisions=record.decisions,
                       out_dir=store.home() / "reports" / record.run_id, run_id=record.run_id,
                       promotions=record.promotions)
    record.report = str(out)
    for file in out.parent.iterdir():
        registry.log_file(record.run_id, str(file), "report")
    create_markdown_artifact(markdown=inline_images(out.read_text(), out.parent),  # the UI cannot fetch local files
                             key=edge.artifact_key(recipe.name, "decision-report"),
                             description=f"{recipe.name}: decision per target (also report/report.html in MLflow)")


def decision(recipe, record) -> str:
    """The decision where each UI shows it first: the parent MLflow run's description (`mlflow.note.content`) and
    tags (`decision.<target>`, its version, alias and `models:/` URI). Returns the one-line summary for the flow
    run's state message."""
    from tasks.decisions.report import decision_markdown, decision_tags, outcome_line, target_outcomes

    outcomes = target_outcomes(record.rows, record.decisions, record.promotions)
    if outcomes:
        registry.set_tags(record.run_id, decision_tags(outcomes)
                          | {"mlflow.note.content": decision_markdown(recipe.name, outcomes)})
    return "; ".join(outcome_line(t, o) for t, o in outcomes.items())


def calibration_origin(spec, base_dir) -> dict:
    """Where the calibration texts came from, as plain values for the MLflow dataset source."""
    from recipes.schema import resolve_path

    if spec.source == "hub":
        return {"source": "hub", "dataset": spec.dataset, "config": spec.dataset_config, "split": spec.split,
                "revision": spec.revision}
    if spec.source in ("files", "request_log"):
        return {"source": spec.source, "paths": [str(resolve_path(p, base_dir).resolve()) for p in spec.paths]}
    return {"source": spec.source}


def representativeness(recipe_name: str, report) -> None:
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return  # called outside a flow run: nowhere to attach artifacts (MLflow has the report)
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(markdown=report.markdown(),
                             key=edge.artifact_key(recipe_name, "calibration-representativeness"),
                             description=f"calibration set representativeness: {report.status}")
    create_table_artifact(table=report.strata_table(), key=edge.artifact_key(recipe_name, "calibration-strata"),
                          description="stratum shares: source vs calibration sample")
    if report.layers:
        create_table_artifact(table=report.layers_table(),
                              key=edge.artifact_key(recipe_name, "calibration-activation-ranges"),
                              description="Linear input abs-max: calibration sample vs held-out sample")
