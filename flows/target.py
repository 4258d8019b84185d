"""Certify one target: its baseline, every format's rung (build, validate, gate), the recovery rungs after the
most aggressive accuracy failure, the ladder's choice, and promotion. Which stage runs next is decided here."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.stages import RunRecord, accuracy_task, build_task, gate_task, latency_task, result_of, timed
from registry import promote, tracking
from tasks import backends
from tasks.decisions import gates, ladder
from tasks.decisions.targets import invalid_reason
from tasks.models import runtime
from tasks.models.placement import DoesNotFit
from tasks.profiles.profile import BASELINE
from tasks.quantization import auto_quantize, qat
from tasks.quantization.recovery import AUTO_QUANTIZE, RecoveredArtifact, RecoveryError, qat_name
from tasks.validation import latency
from tasks.validation.accuracy import LM_EVAL_RESULTS

log = logging.getLogger("enginewright")


def _validate(record: RunRecord, recipe, holdout, profile, device, speed_note: str | None, skip_latency=None) -> tuple:
    """Accuracy, then latency, of one profile in one backend session (vllm: one engine serves both), unless
    `skip_latency(accuracy)` says why no decision can use it (then the latency is recorded as not measured, with
    that reason). Latency runs under the load `gates.latency_load` picks."""
    subject = f"{profile.format}@{profile.target}"
    with backends.get(profile.backend).session(profile.path):
        accuracy = timed(record, "accuracy", subject, accuracy_task, profile_dir=profile.path,
                         profile_fp=profile.fingerprint, backend_name=profile.backend, spec=recipe.evaluation,
                         holdout_file=holdout.holdout_file)
        spec, _ = gates.latency_load(recipe.latency, recipe.gates, speed_note)
        if skip_latency is not None and (why := skip_latency(accuracy)):
            log.info("latency   %-28s not measured: %s", subject, why)
            return accuracy, latency.not_measured(why, spec)
        measured = timed(record, "latency", subject, latency_task, profile_dir=profile.path,
                         profile_fp=profile.fingerprint, backend_name=profile.backend, spec=spec,
                         holdout_file=holdout.holdout_file, holdout_digest=holdout.holdout_digest, device=device)
    return accuracy, measured


def _measured_fields(recipe, speed_note, lat) -> dict:
    """What the row says about how its latency was measured: not at all (and why), or under a reduced load."""
    if lat.summary.get("not_measured"):
        return {"latency_not_measured": lat.summary["not_measured"]}
    _, reduced = gates.latency_load(recipe.latency, recipe.gates, speed_note)
    return {"latency_load": reduced} if reduced else {}


def _measured_tags(recipe, speed_note, lat) -> dict:
    fields = _measured_fields(recipe, speed_note, lat)
    return {"latency_measured": "false" if "latency_not_measured" in fields else "true",
            **({"latency_not_measured": fields["latency_not_measured"]} if "latency_not_measured" in fields else {}),
            **({"latency_load": fields["latency_load"]} if "latency_load" in fields else {})}


def result_row(fmt: str, target, arch: str, status: str, reason: str = "", **extra) -> dict:
    return {"format": fmt, "target": target.name, "arch": arch, "backend": target.backend, "status": status,
            "reason": reason, **extra}


def _log_measurements(run_id: str, accuracy, latency, *, baseline=None, decision=None) -> None:
    """Numbers as MLflow metrics (searchable, sortable): accuracy and latency percentiles; for a candidate also its
    accuracy deltas against the baseline (candidate - baseline) and every gate's value, bound, threshold and pass
    (1/0; absent for a gate that does not decide). lm-eval's own
    results JSON goes with them."""
    metrics = _metrics_of(accuracy, latency)
    if baseline is not None:
        metrics |= {f"delta.{task}.{k}": v - baseline.metrics[task][k] for task, vals in accuracy.metrics.items()
                    for k, v in vals.items() if isinstance(baseline.metrics.get(task, {}).get(k), (int, float))}
    if decision is not None:
        metrics |= {f"gate.{v.gate}.{k}": getattr(v, k) for v in decision.verdicts
                    for k in ("value", "bound", "threshold") if getattr(v, k) is not None}
        # a gate that does not decide has no pass metric (0 would read as a failure); its tag says why
        metrics |= {f"gate.{v.gate}.pass": p for v in decision.verdicts if (p := gates.deciding_pass(v)) is not None}
        metrics["gates.pass"] = decision.status == "pass"
    tracking.log_metrics(run_id, metrics)
    results = Path(accuracy.path) / LM_EVAL_RESULTS
    if results.is_file():
        tracking.log_file(run_id, str(results), "lm_eval")


def _metrics_of(accuracy, latency) -> dict:
    metrics = {f"{task}.{k}": v for task, vals in accuracy.metrics.items() for k, v in vals.items()}
    return metrics | {f"latency.{load.replace('=', '_')}.{k}": v for load, summary in latency.summary.items()
                      if isinstance(summary, dict) for k, v in summary.items() if isinstance(v, (int, float))}


def certify_target(recipe, target, arch, pairs, model, calib, quantized, quant_errors, device, lineage,
                   record: RunRecord, base_dir: Path | None = None) -> None:
    """One target, start to promotion. Targets run at once, except those of a backend whose TARGET_LOCK says one at
    a time in this process (vllm: each engine takes its share of the GPU)."""
    with backends.get(target.backend).TARGET_LOCK:
        _certify_target(recipe, target, arch, pairs, model, calib, quantized, quant_errors, device, lineage, record,
                        base_dir)


def _certify_target(recipe, target, arch, pairs, model, calib, quantized, quant_errors, device, lineage,
                    record: RunRecord, base_dir: Path | None = None) -> None:
    load = recipe.gated_load
    speed_note = gates.latency_note(backends.get(target.backend), recipe.gates)  # None: latency decides on this target
    # Each nested MLflow run spans its work (build, validation, gates): created first, ended when it is done.
    with tracking.child_run(record.run_id, run_name=f"{BASELINE}@{target.name}", tags={"role": "baseline"},
                            params={"format": BASELINE, "target": target.name, "arch": arch}) as base_run:
        baseline = timed(record, "build", f"{BASELINE}@{target.name}", build_task, model_slug=model.name,
                          checkpoint_dir=model.path, checkpoint_fp=model.fingerprint, fmt=BASELINE, quant_algo=None,
                          target=target, device=device)
        base_acc, base_lat = _validate(record, recipe, calib, baseline, device, speed_note)
        tracking.set_tags(base_run, {"artifact_fingerprint": baseline.fingerprint,
                                     **gates.latency_tags(speed_note, base_lat.summary[load]),
                                     **_measured_tags(recipe, speed_note, base_lat)})
        _log_measurements(base_run, base_acc, base_lat)
    record.rows.append(result_row(BASELINE, target, arch, "baseline", accuracy=base_acc.metrics,
                                  latency=base_lat.summary, latency_note=speed_note,
                                  **_measured_fields(recipe, speed_note, base_lat)))

    rungs, profiles, recovering = [], {}, False

    def not_needed(name: str) -> bool:
        """True (and the rung recorded as not evaluated) when the ladder already has its answer."""
        if ladder.keep_going(recipe.ladder.strategy, [r["status"] for r in rungs]):
            return False
        why = f"first_passing: {rungs[-1]['format']} already passed"
        record.rows.append(result_row(name, target, arch, "not evaluated", why))
        return True

    for pair in pairs:
        if pair.skip_reason or pair.format in quant_errors:
            record.rows.append(result_row(pair.format, target, arch, "skipped",
                                          pair.skip_reason or quant_errors[pair.format]))
            continue
        if not_needed(pair.format):
            continue
        rung, profiles[pair.format] = _evaluate_rung(recipe, target, arch, model, calib, pair.format,
                                                     quantized[pair.format], (base_acc, base_lat), device, speed_note,
                                                     record)
        rungs.append(rung)
        if not recovering and gates.accuracy_failed(profiles[pair.format][1]):
            recovering = True  # once per target, after its most aggressive accuracy failure
            for name, make in recovery_rungs(recipe, base_dir, pair.format, quantized[pair.format], target, arch,
                                             model, calib, record):
                if not_needed(name):
                    continue
                art = make()
                if isinstance(art, str):
                    record.rows.append(result_row(name, target, arch, "skipped", art))
                    continue
                rung, profiles[name] = _evaluate_rung(recipe, target, arch, model, calib, name, art,
                                                      (base_acc, base_lat), device, speed_note, record)
                rungs.append(rung)
    choice = ladder.choose(rungs, strategy=recipe.ladder.strategy, metric=recipe.ladder.metric, arch=arch,
                           speed_note=speed_note)
    record.decisions[target.name] = {"format": choice.format, "reason": choice.reason,
                                     "latency_decides": speed_note is None, "latency_note": speed_note}
    tracking.set_tags(record.run_id, {f"latency_decides.{target.name}": str(speed_note is None).lower(),
                                      f"latency_note.{target.name}": speed_note or "deployment runtime"})
    log.info("%s: %s", target.name, choice.reason)
    passing = [profiles[r["format"]] for r in rungs if r["status"] == "pass"]
    _promote(recipe, target, arch, passing, choice, lineage, record)


def _evaluate_rung(recipe, target, arch, model, calib, fmt, q, base, device, speed_note, record: RunRecord):
    """Build, validate, gate and record one rung (a PTQ format, or a recovery rung: q is then a RecoveredArtifact);
    returns the ladder's view of it and (profile, decision, run id, row) for promotion."""
    load, (base_acc, base_lat) = recipe.gated_load, base
    recovered = q.lineage() if isinstance(q, RecoveredArtifact) else None
    with tracking.child_run(
            record.run_id, run_name=f"{fmt}@{target.name}", tags={"role": "recovery" if recovered else "candidate"},
            params={"format": fmt, "target": target.name, "arch": arch, "quant_algo": q.quant_algo,
                    "awq_block_size": q.awq_block_size, "kv_cache": recipe.quantization.kv_cache,
                    **(recovered or {})}) as run_id:
        profile = timed(record, "build", f"{fmt}@{target.name}", build_task, model_slug=model.name,
                         checkpoint_dir=backends.checkpoint_for(q, target), checkpoint_fp=q.fingerprint, fmt=fmt,
                         quant_algo=q.quant_algo, target=target, device=device)
        acc, lat = _validate(record, recipe, calib, profile, device, speed_note,
                             skip_latency=lambda acc: gates.latency_not_needed(
                                 baseline_items_file=base_acc.items_file, candidate_items_file=acc.items_file,
                                 gates=recipe.gates))
        decision = result_of(gate_task.with_options(task_run_name=f"gate {fmt}@{target.name}")(
            baseline_items_file=base_acc.items_file, candidate_items_file=acc.items_file,
            baseline_latency=base_lat.summary[load], candidate_latency=lat.summary[load], gates=recipe.gates,
            latency_note=speed_note))
        tracking.set_tags(run_id, {"decision": decision.status, "artifact_fingerprint": profile.fingerprint,
                                   **{f"gate.{v.gate}": gates.verdict_label(v) for v in decision.verdicts},
                                   **gates.latency_tags(speed_note, lat.summary[load]),
                                   **_measured_tags(recipe, speed_note, lat)})
        _log_measurements(run_id, acc, lat, baseline=base_acc, decision=decision)
        if recovered and q.loss_curve:
            tracking.log_metric_series(run_id, "qat.kl_loss", q.loss_curve)
        tracking.log_dict(run_id, [v.as_dict() for v in decision.verdicts], "gates.json")
        tracking.log_dict(run_id, profile.manifest, "manifest.json")
    row = result_row(fmt, target, arch, decision.status, decision.reason, accuracy=acc.metrics, latency=lat.summary,
               verdicts=[v.as_dict() for v in decision.verdicts], run_id=run_id, latency_note=speed_note,
               **_measured_fields(recipe, speed_note, lat))
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


def recovery_rungs(recipe, base_dir, failed_format: str, ptq, target, arch: str, model, calib, record: RunRecord):
    """The recovery rungs the recipe asks for after `failed_format` failed an accuracy gate on this target, in order,
    as (name, make): make() returns the RecoveredArtifact, or the reason the rung was skipped. Lazy, so the ladder
    can stop before a rung it no longer needs. Each rung runs and is recorded as stage `recover`."""
    spec, cal = recipe.recovery, recipe.calibration
    if spec.auto_quantize is not None:
        aq = spec.auto_quantize

        def make_auto_quantize():
            bad = {f: why for f in aq.formats
                   if (why := invalid_reason(f, arch, runtime=backends.target_runtime(target),
                                             quant_device=runtime.work_device()))}
            if bad:
                return "auto_quantize candidates not valid here: " + "; ".join(f"{f}: {w}" for f, w in bad.items())
            with runtime.MODEL_LOCK:
                return timed(record, "recover", f"{AUTO_QUANTIZE}@{target.name}", auto_quantize.auto_quantize,
                             model_dir=model.path, model_fp=model.fingerprint,
                             calibration_file=calib.calibration_file, calib_digest=calib.digest, spec=aq,
                             recovered_from=failed_format, kv_cache=recipe.quantization.kv_cache,
                             awq_block_size=recipe.quantization.awq_block_size, max_tokens=cal.max_tokens,
                             batch_size=cal.batch_size, tp_sizes=recipe.tp_sizes)

        yield AUTO_QUANTIZE, _guarded(AUTO_QUANTIZE, f"of {failed_format} on {target.name}", make_auto_quantize)
    if spec.qat is not None:

        def make_qat():
            texts = qat.training_texts(cal, base_dir, count=spec.qat.samples, seed=spec.qat.seed,
                                             calibration_file=calib.calibration_file, holdout_file=calib.holdout_file)
            with runtime.MODEL_LOCK:
                return timed(record, "recover", f"{qat_name(failed_format)}@{target.name}", qat.qat,
                             model_dir=model.path, model_fp=model.fingerprint, ptq=ptq, texts=texts,
                             calib_digest=calib.digest, spec=spec.qat)

        yield qat_name(failed_format), _guarded("qat", f"of {failed_format} on {target.name}", make_qat)


def _guarded(method: str, what: str, make):
    """`make` as a rung: a RecoveryError's message, or any other failure (logged with its traceback) named, becomes
    the reason the rung was skipped; one failing rung never takes the others down."""
    def run():
        try:
            return make()
        except (RecoveryError, DoesNotFit) as exc:
            return str(exc)
        except Exception as exc:
            log.exception("%s %s failed", method, what)
            return f"{method} failed: {type(exc).__name__}: {exc}"
    return run


certify_target_task = task(certify_target, name="certify-target", cache_policy=NO_CACHE,
                           task_run_name="target {target.name}")
