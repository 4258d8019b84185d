"""The certify flow: calibrate -> quantize -> build (per target) -> validate -> gate -> promote.

It runs the same way with no server (Prefect's temporary local API, MLflow on a SQLite file) and against a Prefect
server and an MLflow tracking server (set PREFECT_API_URL and MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from prefect import Task, flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from flows import prefect_edge as edge
from flows import publish
from flows.stages import (build_task, calibrate_task, evaluate_task, gate_task, import_task, latency_task,
                          quantize_task, result_of)
from flows.quantize_flow import quantize_elsewhere
from recipes.load import load_recipe
from registry import artifact_share
from registry import mlflow_registry as registry
from tasks import gates, ladder, promote, quantize, recover, store
from tasks.build import BASELINE
from tasks.evaluate import LM_EVAL_RESULTS, check_item_counts
from tasks.quantize import QuantizationError
from tasks.targets import make_plan

log = logging.getLogger("enginewright")


@dataclass
class RunRecord:
    """What the run did, for the summary table, the MLflow run and the CLI's exit code."""
    run_id: str = ""
    stages: list[dict] = field(default_factory=list)  # stage, subject, seconds, cached
    rows: list[dict] = field(default_factory=list)  # one per (format, target), baseline included
    promotions: list[dict] = field(default_factory=list)
    decisions: dict[str, dict] = field(default_factory=dict)  # target -> the ladder's choice and why
    errors: list[str] = field(default_factory=list)
    report: str | None = None

    def stage(self, name: str, subject: str, started: float, result) -> None:
        cached = bool(getattr(result, "cached", False))
        seconds = round(time.perf_counter() - started, 2)
        self.stages.append({"stage": name, "subject": subject, "seconds": seconds, "cached": cached,
                            "started_at": round(time.time() - seconds, 3)})
        log.info("%-9s %-28s %s", name, subject, "cache hit" if cached else f"{seconds:.1f} s")


TASK_LABEL = {"accuracy": "evaluate"}  # the stage's name in Prefect task run names, e.g. "evaluate fp8@h100"


def _timed(record: RunRecord, name: str, subject: str, fn, *args, **kwargs):
    log.info("▶ %s %s", name, subject)
    started = time.perf_counter()
    if isinstance(fn, Task):
        fn = fn.with_options(task_run_name=f"{TASK_LABEL.get(name, name)} {subject}")
    result = result_of(fn(*args, **kwargs))
    record.stage(name, subject, started, result)
    return result


def _validate(record: RunRecord, recipe, holdout, profile, device) -> tuple:
    subject = f"{profile.format}@{profile.target}"
    accuracy = _timed(record, "accuracy", subject, evaluate_task, profile_dir=profile.path,
                      profile_fp=profile.fingerprint, backend_name=profile.backend, spec=recipe.evaluation,
                      holdout_file=holdout.holdout_file)
    latency = _timed(record, "latency", subject, latency_task, profile_dir=profile.path,
                     profile_fp=profile.fingerprint, backend_name=profile.backend, spec=recipe.latency,
                     holdout_file=holdout.holdout_file, holdout_digest=holdout.holdout_digest, device=device)
    return accuracy, latency


def _row(fmt: str, target, arch: str, status: str, reason: str = "", **extra) -> dict:
    return {"format": fmt, "target": target.name, "arch": arch, "backend": target.backend, "status": status,
            "reason": reason, **extra}


def _log_measurements(run_id: str, accuracy, latency, *, baseline=None, decision=None) -> None:
    """Numbers as MLflow metrics (searchable, sortable): accuracy and latency percentiles; for a candidate also its
    accuracy deltas against the baseline and every gate's value, bound, threshold and pass (1/0). lm-eval's own
    results JSON goes with them."""
    metrics = _metrics_of(accuracy, latency)
    if baseline is not None:
        metrics |= {f"delta.{task}.{k}": v - baseline.metrics[task][k] for task, vals in accuracy.metrics.items()
                    for k, v in vals.items() if isinstance(baseline.metrics.get(task, {}).get(k), (int, float))}
    if decision is not None:
        metrics |= {f"gate.{v.gate}.{k}": getattr(v, k) for v in decision.verdicts
                    for k in ("value", "bound", "threshold") if getattr(v, k) is not None}
        metrics |= {f"gate.{v.gate}.pass": v.verdict == "pass" for v in decision.verdicts}
        metrics["gates.pass"] = decision.status == "pass"
    registry.log_metrics(run_id, metrics)
    results = Path(accuracy.path) / LM_EVAL_RESULTS
    if results.is_file():
        registry.log_file(run_id, str(results), "lm_eval")


def _metrics_of(accuracy, latency) -> dict:
    metrics = {f"{task}.{k}": v for task, vals in accuracy.metrics.items() for k, v in vals.items()}
    return metrics | {f"latency.{load.replace('=', '_')}.{k}": v for load, summary in latency.summary.items()
                      if isinstance(summary, dict) for k, v in summary.items() if isinstance(v, (int, float))}


def resolve_inputs(recipe_path: str, overrides: list[str] | None, model_location: str | None,
                   model_version: str | None, targets: list[str] | None):
    """The recipe as this run sees it: overrides, a new model version's location, and a subset of targets."""
    from recipes.schema import RecipeError

    extra = list(overrides or [])
    if model_location or model_version:
        raw, _ = load_recipe(recipe_path, extra)
        if raw.model.source == "hub":
            extra += [f"model.id={model_location}"] if model_location else []
            extra += [f"model.revision={model_version}"] if model_version else []
        elif model_location:
            extra.append(f"model.path={model_location}")
    recipe, base_dir = load_recipe(recipe_path, extra)
    if targets:
        unknown = sorted(set(targets) - {t.name for t in recipe.targets})
        if unknown:
            raise RecipeError(f"targets {unknown} are not in the recipe (it has {[t.name for t in recipe.targets]})")
        recipe = recipe.model_copy(update={"targets": [t for t in recipe.targets if t.name in targets]})
    return recipe, base_dir


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
    device = store.local_device()
    plan = make_plan(recipe, device)
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
    record.run_id = registry.start_pipeline_run(
        experiment=recipe.name, run_name=run_name, recipe_file=recipe_file, source_name=str(Path(__file__).resolve()),
        recipe_digest=recipe.digest(), params={"formats": recipe.quantization.formats,
                                               "targets": [t.name for t in recipe.targets], "device": device["arch"]},
        tags={"model": recipe.model.slug, "model_version": model_version or "unversioned",
              "toolchain": registry.dumps(store.toolchain())} | edge.mlflow_tags())
    edge.publish_mlflow_link(recipe.name, registry.run_url(record.run_id), run_name)
    status = "FAILED"
    try:
        _certify(recipe, base_dir, device, plan, record)
        status = "FINISHED"
    finally:
        registry.log_dict(record.run_id, {"stages": record.stages, "rows": record.rows, "decisions": record.decisions,
                                          "promotions": record.promotions, "errors": record.errors}, "summary.json")
        publish.report(recipe, record)
        registry.end_run(record.run_id, status)
    result = {"run_id": record.run_id, "stages": record.stages, "rows": record.rows, "promotions": record.promotions,
              "decisions": record.decisions, "errors": record.errors, "report": record.report,
              "gated_load": recipe.gated_load, "tracking_uri": registry.tracking_uri()}
    result["outcome"], message = _outcome(record)
    if record.errors:  # the run record still comes back: state.result(raise_on_failure=False)
        return Failed(message="; ".join(record.errors), data=result)
    if result["outcome"] == "not_certified":  # CI and automations must see this: not a Completed run
        return Failed(name="NotCertified", message=message, data=result)
    return result


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


def _check_calibration(recipe, model, calib, record: RunRecord):
    """The calibration set's representativeness report, before any quantization: logged to MLflow, shown as Prefect
    artifacts; a failed threshold warns, or with `action: stop` raises RepresentativenessError here."""
    from tasks import representativeness as rep

    report = _timed(record, "represent", recipe.calibration.source, rep.assess, recipe.calibration, calib,
                    model_dir=model.path, model_fp=model.fingerprint)
    inputs = rep.load_inputs(calib.path)
    registry.log_representativeness(
        record.run_id, report=report.as_dict(), markdown=report.markdown(), strata=report.strata_table(),
        layers=report.layers_table(), metrics=report.metrics(), status=report.status,
        figure=rep.figure(report, sample_tokens=inputs["sample_tokens"], reference_tokens=inputs["reference_tokens"],
                          first_n_tokens=inputs["first_n_tokens"]))
    publish.representativeness(recipe.name, report)
    for message in rep.enforce(report):
        log.warning("calibration representativeness: %s", message)
    return report


def prepare(recipe, base_dir, record: RunRecord):
    """Import the model and build the calibration set (each cached, or fetched from the shared artifact store)."""
    model = _timed(record, "import", recipe.model.slug, import_task, recipe.model, base_dir)
    calib = _timed(record, "calibrate", recipe.calibration.source, calibrate_task, recipe.calibration,
                   model_dir=model.path, base_dir=base_dir)
    return model, calib


def quantize_formats(recipe, plan, model, calib, record: RunRecord) -> tuple[dict, dict]:
    """Every format some target can use, once; a format that cannot be applied is recorded with its reason."""
    quantized, quant_errors = {}, {}
    for fmt in plan.formats_to_quantize:
        try:
            quantized[fmt] = _timed(record, "quantize", fmt, quantize_task, model_dir=model.path,
                                    model_fp=model.fingerprint, calibration_file=calib.calibration_file,
                                    calib_digest=calib.digest, fmt=fmt, kv_cache=recipe.quantization.kv_cache,
                                    awq_block_size=recipe.quantization.awq_block_size,
                                    max_tokens=recipe.calibration.max_tokens,
                                    batch_size=recipe.calibration.batch_size,
                                    tp_sizes=quantize.recipe_tp_sizes(recipe),
                                    trtllm_tps=quantize.recipe_trtllm_tps(recipe))
        except QuantizationError as exc:
            quant_errors[fmt] = str(exc)
        except Exception as exc:  # any failure of one format is recorded; the other formats and targets go on
            log.exception("quantize %s failed", fmt)
            quant_errors[fmt] = f"quantize failed: {type(exc).__name__}: {exc}"
            record.errors.append(f"quantize {fmt}: {type(exc).__name__}: {exc}")
    return quantized, quant_errors


def _certify(recipe, base_dir, device, plan, record: RunRecord) -> None:
    model, calib = prepare(recipe, base_dir, record)
    registry.log_calibration_dataset(record.run_id, calibration_file=calib.calibration_file, digest=calib.digest,
                                     stats=calib.stats, origin=publish.calibration_origin(recipe.calibration, base_dir))
    check_item_counts(recipe.evaluation, calib.holdout_file)  # too few held-out items: stop before quantizing
    _check_calibration(recipe, model, calib, record)  # may stop the run here, before any quantization
    lineage = {"model_fingerprint": model.fingerprint, "calibration_digest": calib.digest,
               "recipe_sha": recipe.digest(), "source_run_id": record.run_id, "model_source": model.source}

    quantized, quant_errors = quantize_formats(recipe, plan, model, calib, record)

    futures = {}
    for target in recipe.targets:  # every placed target at once; each reports its own outcome
        arch = plan.target_arch[target.name]
        pairs = [p for p in plan.pairs if p.target == target.name]
        if target.name in plan.unplaced:
            record.rows += [_row(p.format, target, arch, "skipped", p.skip_reason) for p in pairs]
            continue
        futures[target.name] = certify_target_task.submit(recipe, target, arch, pairs, model, calib, quantized,
                                                          quant_errors, device, lineage, record, base_dir=base_dir)
    for name, future in futures.items():
        try:
            future.result()
        except Exception as exc:  # one target failing must not stop the others
            log.error("target %s failed: %s: %s", name, type(exc).__name__, exc)
            record.errors.append(f"target {name}: {type(exc).__name__}: {exc}")


def _certify_target(recipe, target, arch, pairs, model, calib, quantized, quant_errors, device, lineage,
                    record: RunRecord, base_dir: Path | None = None) -> None:
    load = recipe.gated_load
    speed_note = gates.latency_note(target.backend, recipe.gates)  # None: latency decides on this target
    # Each nested MLflow run spans its work (build, validation, gates): created first, ended when it is done.
    with registry.child_run(record.run_id, run_name=f"{BASELINE}@{target.name}", tags={"role": "baseline"},
                            params={"format": BASELINE, "target": target.name, "arch": arch}) as base_run:
        baseline = _timed(record, "build", f"{BASELINE}@{target.name}", build_task, model_slug=model.name,
                          checkpoint_dir=model.path, checkpoint_fp=model.fingerprint, fmt=BASELINE, quant_algo=None,
                          target=target, device=device)
        base_acc, base_lat = _validate(record, recipe, calib, baseline, device)
        registry.set_tags(base_run, {"artifact_fingerprint": baseline.fingerprint,
                                     **gates.latency_tags(speed_note, base_lat.summary[load])})
        _log_measurements(base_run, base_acc, base_lat)
    record.rows.append(_row(BASELINE, target, arch, "baseline", accuracy=base_acc.metrics, latency=base_lat.summary,
                            latency_note=speed_note))

    rungs, profiles, recovering = [], {}, False

    def not_needed(name: str) -> bool:
        """True (and the rung recorded as not evaluated) when the ladder already has its answer."""
        if ladder.keep_going(recipe.ladder.strategy, [r["status"] for r in rungs]):
            return False
        why = f"first_passing: {rungs[-1]['format']} already passed"
        record.rows.append(_row(name, target, arch, "not evaluated", why))
        return True

    for pair in pairs:
        if pair.skip_reason or pair.format in quant_errors:
            record.rows.append(_row(pair.format, target, arch, "skipped", pair.skip_reason or quant_errors[pair.format]))
            continue
        if not_needed(pair.format):
            continue
        rung, profiles[pair.format] = _evaluate_rung(recipe, target, arch, model, calib, pair.format,
                                                     quantized[pair.format], (base_acc, base_lat), device, speed_note,
                                                     record)
        rungs.append(rung)
        if not recovering and recover.accuracy_failed(profiles[pair.format][1]):
            recovering = True  # once per target, after its most aggressive accuracy failure
            for name, make in recover.recovery_rungs(recipe, base_dir, pair.format, quantized[pair.format], target,
                                                     arch, model, calib, timed=partial(_timed, record)):
                if not_needed(name):
                    continue
                art = make()
                if isinstance(art, str):
                    record.rows.append(_row(name, target, arch, "skipped", art))
                    continue
                rung, profiles[name] = _evaluate_rung(recipe, target, arch, model, calib, name, art,
                                                      (base_acc, base_lat), device, speed_note, record)
                rungs.append(rung)
    choice = ladder.choose(rungs, strategy=recipe.ladder.strategy, metric=recipe.ladder.metric, arch=arch,
                           speed_note=speed_note)
    record.decisions[target.name] = {"format": choice.format, "reason": choice.reason,
                                     "latency_decides": speed_note is None, "latency_note": speed_note}
    registry.set_tags(record.run_id, {f"latency_decides.{target.name}": str(speed_note is None).lower(),
                                      f"latency_note.{target.name}": speed_note or "deployment runtime"})
    log.info("%s: %s", target.name, choice.reason)
    passing = [profiles[r["format"]] for r in rungs if r["status"] == "pass"]
    _promote(recipe, target, arch, passing, choice, lineage, record)


def _evaluate_rung(recipe, target, arch, model, calib, fmt, q, base, device, speed_note, record: RunRecord):
    """Build, validate, gate and record one rung (a PTQ format, or a recovery rung: q is then a RecoveredArtifact);
    returns the ladder's view of it and (profile, decision, run id, row) for promotion."""
    load, (base_acc, base_lat) = recipe.gated_load, base
    recovered = q.lineage() if isinstance(q, recover.RecoveredArtifact) else None
    with registry.child_run(
            record.run_id, run_name=f"{fmt}@{target.name}", tags={"role": "recovery" if recovered else "candidate"},
            params={"format": fmt, "target": target.name, "arch": arch, "quant_algo": q.quant_algo,
                    "awq_block_size": q.awq_block_size, "kv_cache": recipe.quantization.kv_cache,
                    **(recovered or {})}) as run_id:
        profile = _timed(record, "build", f"{fmt}@{target.name}", build_task, model_slug=model.name,
                         checkpoint_dir=quantize.checkpoint_for(q, target), checkpoint_fp=q.fingerprint, fmt=fmt,
                         quant_algo=q.quant_algo, target=target, device=device)
        acc, lat = _validate(record, recipe, calib, profile, device)
        decision = gate_task.with_options(task_run_name=f"gate {fmt}@{target.name}")(
            baseline_items_file=base_acc.items_file, candidate_items_file=acc.items_file,
            baseline_latency=base_lat.summary[load], candidate_latency=lat.summary[load], gates=recipe.gates,
            latency_note=speed_note)
        registry.set_tags(run_id, {"decision": decision.status, "artifact_fingerprint": profile.fingerprint,
                                   **gates.latency_tags(speed_note, lat.summary[load])})
        _log_measurements(run_id, acc, lat, baseline=base_acc, decision=decision)
        if recovered and q.loss_curve:
            registry.log_metric_series(run_id, "qat.kl_loss", q.loss_curve)
        registry.log_dict(run_id, [v.as_dict() for v in decision.verdicts], "gates.json")
        registry.log_dict(run_id, profile.manifest, "manifest.json")
    row = _row(fmt, target, arch, decision.status, decision.reason, accuracy=acc.metrics, latency=lat.summary,
               verdicts=[v.as_dict() for v in decision.verdicts], run_id=run_id, latency_note=speed_note)
    rung = {"format": fmt, "status": decision.status, "reason": decision.reason, "latency": lat.summary[load]}
    if recovered:
        row |= {"recovery": recovered | {"seconds": q.seconds, "config": q.config, "loss_curve": q.loss_curve},
                "version_tags": recovered}
        rung |= {"cost_format": q.cost_format, "weight_bits": q.weight_bits}
    record.rows.append(row)
    return rung, (profile, decision, run_id, row)


def _promote(recipe, target, arch, passing, choice, lineage, record: RunRecord) -> None:
    record.promotions += promote.promote(recipe=recipe, target=target, arch=arch, passing=passing, choice=choice,
                                         lineage=lineage)


certify_target_task = task(_certify_target, name="certify-target", cache_policy=NO_CACHE,
                           task_run_name="target {target.name}")
