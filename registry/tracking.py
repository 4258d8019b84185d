"""MLflow tracking: the pipeline's runs, their metrics, datasets, representativeness, and abandoned runs.

Only registry/ imports mlflow. Everything takes and returns plain values, so the stages never need a server. The
connection is client.py; versions and aliases are model_registry.py.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from registry.client import UI_QUERY, client, code_version, experiment_id, ui_url, unique_key_collision
from tasks import store
from tasks.host import liveness

# Which process a run belongs to: a run left RUNNING by a killed process is found by fail_abandoned_runs().
PROCESS_TAGS = {"host": "enginewright.host", "pid": "enginewright.pid", "started": "enginewright.pid_started"}


def _process_tags() -> dict[str, str]:
    return {PROCESS_TAGS[k]: v for k, v in liveness.identity().items()}


def source_tags(source_name: str) -> dict:
    """MLflow's standard run tags (mlflow.user, mlflow.source.name/type, mlflow.source.git.*), as the fluent API
    sets them; the client API used here does not. The commit is this checkout's, wherever the process started."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME

    tags = resolve_tags()
    tags[MLFLOW_SOURCE_NAME] = source_name
    commit = code_version()
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def start_pipeline_run(*, experiment: str, run_name: str, recipe_file: Path, recipe_digest: str,
                       params: dict, tags: dict, source_name: str = "enginewright") -> str:
    c = client()
    run = c.create_run(experiment_id(experiment), run_name=run_name,
                       tags=source_tags(source_name) | {"recipe_sha": recipe_digest,
                                                        "code_version": code_version() or "unknown",
                                                        **_process_tags(), **tags})
    rid = run.info.run_id
    c.log_batch(rid, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    c.log_artifact(rid, str(recipe_file), "recipe")
    return rid


def start_child_run(parent_run_id: str, *, run_name: str, params: dict, tags: dict) -> str:
    """A nested run under the pipeline run, with the parent's source, user and Prefect tags."""
    c = client()
    parent = c.get_run(parent_run_id)
    inherited = {k: v for k, v in parent.data.tags.items()
                 if k.startswith(("mlflow.source.", "mlflow.user", "prefect."))}
    run = c.create_run(parent.info.experiment_id, run_name=run_name,
                       tags=inherited | {"mlflow.parentRunId": parent_run_id, **_process_tags(), **tags})
    c.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
    return run.info.run_id


@contextmanager
def child_run(parent_run_id: str, *, run_name: str, params: dict, tags: dict):
    """A nested run that spans the work inside the block: FINISHED when it completes, FAILED when it raises."""
    run_id = start_child_run(parent_run_id, run_name=run_name, params=params, tags=tags)
    try:
        yield run_id
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    end_run(run_id)


def set_tags(run_id: str, tags: dict) -> None:
    client().log_batch(run_id, tags=[mlflow.entities.RunTag(k, str(v)[:5000]) for k, v in tags.items()
                                     if v is not None])


def log_metrics(run_id: str, metrics: dict, step: int = 0) -> None:
    """Numbers as MLflow metrics, stamped with the time they were logged (not 0: the UI plots them over time)."""
    now = int(time.time() * 1000)
    _log_batch(run_id, [mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and v == v])  # bools become 1.0/0.0; NaN is dropped


def _log_batch(run_id: str, metrics: list) -> None:
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client().log_batch(run_id, metrics=metrics[i:i + 1000])


def run_url(run_id: str) -> str:
    """The run's page in the MLflow UI (for a local SQLite store: where the printed `mlflow ui` serves it)."""
    run = client().get_run(run_id)
    return f"{ui_url()}/#/experiments/{run.info.experiment_id}/runs/{run_id}{UI_QUERY}"


def log_dict(run_id: str, data: dict | list, artifact_file: str) -> None:
    client().log_dict(run_id, data, artifact_file)


def log_file(run_id: str, path: str, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, path, artifact_path)


def log_calibration_dataset(run_id: str, *, calibration_file: str, digest: str, stats: dict, origin: dict) -> None:
    """The calibration set as an MLflow dataset input (content digest + source), plus its statistics.

    `origin` says where the texts came from: {"source": "hub", "dataset", "config", "split", "revision"} becomes
    MLflow's Hugging Face dataset source; any other source (local files, request logs, pydoc) is recorded as the
    calibration parquet itself (a local file source), with the origin kept as the run tag `calibration.origin`.
    """
    import pandas as pd

    df = pd.read_parquet(calibration_file)
    dataset = mlflow.data.from_pandas(df, source=_dataset_source(calibration_file, origin), name="calibration",
                                      digest=digest[:32])
    c = client()
    inputs = [mlflow.entities.DatasetInput(dataset._to_mlflow_entity(),
                                           tags=[mlflow.entities.InputTag("mlflow.data.context", "calibration")])]
    # MLflow creates a dataset row by check-then-insert: two runs logging the same set at once collide on its unique
    # key. One at a time on this host; a collision with another host's insert is retried (it then finds the row).
    with store.lock(store.home() / "locks" / "mlflow-datasets"):
        try:
            c.log_inputs(run_id, datasets=inputs)
        except MlflowException as exc:
            if not unique_key_collision(exc):
                raise
            c.log_inputs(run_id, datasets=inputs)
    c.set_tag(run_id, "calibration.origin", json.dumps(origin, sort_keys=True, default=str)[:5000])
    log_metrics(run_id, {f"calibration.{k}": v for k, v in stats.items()})


def _dataset_source(calibration_file: str, origin: dict):
    """An MLflow DatasetSource object: a plain string like `files:/...` is refused by MLflow's source resolver."""
    if origin.get("source") == "hub":
        from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

        return HuggingFaceDatasetSource(path=origin["dataset"], config_name=origin.get("config"),
                                        split=origin.get("split"), revision=origin.get("revision"))
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    uri = Path(calibration_file).resolve().as_uri()
    return get_dataset_source_from_json(json.dumps({"uri": uri}), source_type="local")


def log_metric_series(run_id: str, key: str, values: list[float]) -> None:
    """One metric with a value per step (e.g. a training loss curve)."""
    now = int(time.time() * 1000)
    _log_batch(run_id, [mlflow.entities.Metric(key, float(v), now, step) for step, v in enumerate(values)])


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status)


def fail_abandoned_runs() -> list[dict]:
    """Mark FAILED the RUNNING runs of this host whose process is gone (killed, crashed); returns what it marked."""
    from mlflow.entities import ViewType

    c, host = client(), liveness.identity()["host"]
    experiments = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    if not experiments:
        return []
    marked = []
    running = c.search_runs(experiments, f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAGS['host']}` = '{host}'",
                            run_view_type=ViewType.ALL, max_results=5000)
    for run in running:
        tags = run.data.tags
        reason = liveness.gone(host, tags.get(PROCESS_TAGS["pid"], ""), tags.get(PROCESS_TAGS["started"], ""))
        if reason:
            c.set_tag(run.info.run_id, "enginewright.abandoned", reason)
            c.set_terminated(run.info.run_id, "FAILED")
            marked.append({"run_id": run.info.run_id, "name": run.info.run_name, "reason": reason})
    return marked


def log_representativeness(run_id: str, *, report: dict, markdown: str, strata: list[dict], layers: list[dict],
                           metrics: dict, status: str, figure=None) -> None:
    """The calibration set's representativeness report on the pipeline run: the report (JSON and markdown), the
    strata and activation-range tables, ``representativeness.*`` metrics, a status tag and the plot (PNG)."""
    import pandas as pd

    c = client()
    c.log_dict(run_id, report, "representativeness/report.json")
    c.log_text(run_id, markdown, "representativeness/report.md")
    c.log_table(run_id, pd.DataFrame(strata), "representativeness/strata.json")
    if layers:
        c.log_table(run_id, pd.DataFrame(layers), "representativeness/activation_ranges.json")
    log_metrics(run_id, {f"representativeness.{k}": v for k, v in metrics.items()})
    c.set_tag(run_id, "calibration.representativeness", status)
    if figure is not None:
        import matplotlib.pyplot as plt

        c.log_figure(run_id, figure, "representativeness/report.png")
        plt.close(figure)
