"""The certify flow: calibrate -> quantize -> build (per target) -> validate -> gate -> promote.

It runs the same way with no server (Prefect's temporary local API, MLflow on a SQLite file) and against a Prefect
server and an MLflow tracking server (set PREFECT_API_URL and MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from prefect import flow
from prefect.states import Completed, Failed

from flows import prefect_edge as edge
from flows import publish
from flows.prepare import check_calibration, prepare, quantize_formats, resolve_inputs
from flows.quantize_flow import quantize_elsewhere
from flows.stages import RunRecord
from flows.target import certify_target_task, result_row
from registry import artifact_share, tracking
from registry import client as registry_client
from tasks import store
from tasks.backends import target_runtime
from tasks.decisions.targets import make_plan
from tasks.host import machine
from tasks.validation.accuracy import check_item_counts

log = logging.getLogger("enginewright")


@flow(name="certify", log_prints=True, flow_run_name=edge.flow_run_name)
def certify(recipe_path: str, overrides: list[str] | None = None, model_location: str | None = None,
            model_version: str | None = None, targets: list[str] | None = None, dry_run: bool = False) -> dict:
    """Certify a model for every target in the recipe; returns the run record as a dict (the flow run is Failed,
    with the record as its data, when a target or stage errored; a gate saying no is not an error).

    Args:
        recipe_path: the recipe YAML (relative to the working directory of the process that runs the flow).
        overrides: `key.path=value` recipe overrides.
        model_location: a new model version's location: model.path for hf_dir/gguf sources, model.id for hub.
        model_version: the version label (hub: the revision); recorded as a tag on every run and version.
        targets: run only these recipe targets (by name).
        dry_run: compute and return the plan only.
    """
    recipe_file = Path(recipe_path)
    recipe, base_dir = resolve_inputs(recipe_path, overrides, model_location, model_version, targets)
    device = machine.local_device()
    plan = make_plan(recipe, device, runtime_of=target_runtime)
    edge.tag_scheduled_run()
    if dry_run:
        pairs = [p.__dict__ for p in plan.pairs]
        edge.publish_plan(recipe.name, pairs)
        return {"dry_run": True, "pairs": pairs}
    store.sweep_temporaries()  # what writers killed on this host left behind
    artifact_share.enable()  # with a tracking server, stage outputs travel through its artifact store
    quantize_elsewhere(recipe_path, overrides, model_location, model_version)
    record = RunRecord()
    run_name = f"certify-{time.strftime('%Y%m%d-%H%M%S')}"
    record.run_id = tracking.start_pipeline_run(
        experiment=recipe.name, run_name=run_name, recipe_file=recipe_file, source_name=str(Path(__file__).resolve()),
        recipe_digest=recipe.digest(), params={"formats": recipe.quantization.formats,
                                               "targets": [t.name for t in recipe.targets], "device": device["arch"]},
        tags={"model": recipe.model.slug, "model_version": model_version or "unversioned",
              "toolchain": registry_client.dumps(machine.toolchain())} | edge.mlflow_tags())
    edge.publish_mlflow_link(recipe.name, tracking.run_url(record.run_id), run_name)
    status, headline = "FAILED", ""
    try:
        _certify(recipe, base_dir, device, plan, record)
        status = "FINISHED"
    finally:
        tracking.log_dict(record.run_id, {"stages": record.stages, "rows": record.rows, "decisions": record.decisions,
                                          "promotions": record.promotions, "errors": record.errors}, "summary.json")
        publish.report(recipe, record)
        headline = publish.decision(recipe, record)
        tracking.end_run(record.run_id, status)
    result = {"run_id": record.run_id, "stages": record.stages, "rows": record.rows, "promotions": record.promotions,
              "decisions": record.decisions, "errors": record.errors, "report": record.report,
              "gated_load": recipe.gated_load, "tracking_uri": registry_client.tracking_uri()}
    result["outcome"], message = _outcome(record)
    if record.errors:  # the run record still comes back: state.result(raise_on_failure=False)
        return Failed(message="; ".join(record.errors), data=result)
    if result["outcome"] == "not_certified":  # CI and automations must see this: not a Completed run
        return Failed(name="NotCertified", message=message, data=result)
    return Completed(message=headline or message, data=result)  # the flow run's page names the winners


def _outcome(record: RunRecord) -> tuple[str, str]:
    """certified: every target that ran here chose a passing format; not_certified: some target did not (or none
    ran); error: a target or stage failed."""
    if record.errors:
        return "error", "; ".join(record.errors)
    if not record.decisions:
        return "not_certified", "nothing certified: no target of this run was placed on this machine"
    missing = sorted(t for t, d in record.decisions.items() if d["format"] is None)
    if missing:
        return "not_certified", "nothing certified for " + "; ".join(
            f"target {t}: {record.decisions[t]['reason']}" for t in missing)
    return "certified", "certified: " + ", ".join(f"{t}: {d['format']}" for t, d in sorted(record.decisions.items()))


def _certify(recipe, base_dir, device, plan, record: RunRecord) -> None:
    model, calib = prepare(recipe, base_dir, record)
    tracking.log_calibration_dataset(record.run_id, calibration_file=calib.calibration_file, digest=calib.digest,
                                     stats=calib.stats, origin=publish.calibration_origin(recipe.calibration, base_dir))
    check_item_counts(recipe.evaluation, calib.holdout_file)  # too few held-out items: stop before quantizing
    check_calibration(recipe, model, calib, record)  # may stop the run here, before any quantization
    lineage = {"model_fingerprint": model.fingerprint, "calibration_digest": calib.digest,
               "recipe_sha": recipe.digest(), "source_run_id": record.run_id, "model_source": model.source}

    quantized, quant_errors = quantize_formats(recipe, plan, model, calib, record)

    futures = {}
    for target in recipe.targets:  # every placed target at once; each reports its own outcome
        arch = plan.target_arch[target.name]
        pairs = [p for p in plan.pairs if p.target == target.name]
        if target.name in plan.unplaced:
            record.rows += [result_row(p.format, target, arch, "skipped", p.skip_reason) for p in pairs]
            continue
        futures[target.name] = certify_target_task.submit(recipe, target, arch, pairs, model, calib, quantized,
                                                          quant_errors, device, lineage, record, base_dir=base_dir)
    for name, future in futures.items():
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - one target failing must not stop the others
            log.error("target %s failed: %s: %s", name, type(exc).__name__, exc)
            record.errors.append(f"target {name}: {type(exc).__name__}: {exc}")
