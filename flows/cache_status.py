"""What a run would reuse and what it would redo, and why, computed from cache keys alone (no heavy work).

Quantize and build manifests record their key's named inputs; when a key has no artifact, the newest artifact of
the same stage and subject is diffed against the current inputs ("toolchain.modelopt: 0.46.0 -> 0.47.0").
"""

from __future__ import annotations

from pathlib import Path

from recipes.schema import resolve_path
from tasks import backends, store
from tasks.calibration import calibrate
from tasks.decisions.targets import Pair
from tasks.models import import_model
from tasks.profiles import build
from tasks.profiles.profile import BASELINE
from tasks.quantization import quantize


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    return v[:10] if isinstance(v, str) and len(v) >= 32 else str(v)


def explain(out: Path, siblings: list[Path], parts: dict, field: str = "inputs") -> tuple[bool, str]:
    """(cached, reason): cached when `out` holds a complete artifact; else what differs from the newest sibling
    (its manifest's `field`: the key's named inputs; calibrate records its spec)."""
    if store.read_manifest(out) is not None:
        return True, "cache hit"
    previous = [(p.stat().st_mtime, m) for p in siblings if (m := store.read_manifest(p)) and field in m]
    if not previous:
        return False, "never built"
    before = _flatten(max(previous, key=lambda x: x[0])[1][field])
    now = _flatten(parts)
    diffs = [f"{k}: {_short(before.get(k))} → {_short(now.get(k))}" for k in sorted(set(before) | set(now))
             if before.get(k) != now.get(k)]
    return False, "; ".join(diffs) or "inputs changed"


def plan_stages(recipe, base_dir: Path, plan, device: dict) -> list[dict]:
    """One row per stage and subject: would it run, and why. Every key and directory comes from the stage's own
    functions (`out_dir`, `cache_key`, `key_parts`), never spelled again here."""
    rows: list[dict] = []

    def row(stage, subject, cached, reason, estimate_s=None):
        rows.append({"stage": stage, "subject": subject, "action": "reuse" if cached else "run", "reason": reason,
                     "estimate_s": None if cached else estimate_s})

    if recipe.model.source == "hf_dir":
        model_dir = resolve_path(recipe.model.path, base_dir)
        model_fp = import_model.fingerprint_in_place(recipe.model, base_dir)
        row("import", recipe.model.slug, True, "local checkpoint used in place")
    else:
        out = import_model.out_dir(recipe.model, base_dir)
        manifest = store.read_manifest(out)
        row("import", recipe.model.slug, manifest is not None, "cache hit" if manifest else "not converted yet")
        if manifest is None:
            row("calibrate", recipe.calibration.source, False, "after the model is imported")
            _downstream(row, recipe, plan, "after the model is imported")
            return rows
        model_dir, model_fp = out, manifest["content_hash"]

    calib_out = calibrate.out_dir(calibrate.cache_key(recipe.calibration, model_dir=str(model_dir),
                                                      base_dir=base_dir))
    calib = store.read_manifest(calib_out)
    spec_now = recipe.calibration.model_dump(mode="json")
    siblings = [p for p in calib_out.parent.glob("*") if p != calib_out]
    cached, reason = explain(calib_out, siblings, spec_now, field="spec")
    if not cached and reason == "inputs changed":
        reason = "the source's content, the tokenizer or the calibration code changed"
    row("calibrate", recipe.calibration.source, cached, reason, _estimate(siblings, cached))
    if calib is None:
        _downstream(row, recipe, plan, "runs on the new calibration set")
        return rows

    checkpoints = {}
    for fmt in plan.formats_to_quantize:
        try:
            block = quantize.resolved_block_size(fmt, str(model_dir), recipe.quantization.awq_block_size,
                                                 recipe.tp_sizes)
        except quantize.QuantizationError as exc:
            row("quantize", fmt, False, f"will fail: {exc}")
            continue
        parts = quantize.key_parts(model_fp=model_fp, calib_digest=calib["digest"], fmt=fmt,
                                   kv_cache=recipe.quantization.kv_cache, awq_block_size=block,
                                   max_tokens=recipe.calibration.max_tokens,
                                   batch_size=recipe.calibration.batch_size, device=quantize.work_device(),
                                   trtllm_tps=backends.checkpoint_tps(recipe.targets))
        out = quantize.out_dir(fmt, parts)
        siblings = [p for p in out.parent.glob("*") if p != out]
        cached, reason = explain(out, siblings, parts)
        row("quantize", fmt, cached, reason, _estimate(siblings, cached))
        if cached:
            checkpoints[fmt] = store.read_manifest(out)["content_hash"]

    baselines = [Pair(BASELINE, name, arch) for name, arch in plan.target_arch.items() if name not in plan.unplaced]
    checkpoints[BASELINE] = model_fp
    profiles: dict[str, str | None] = {}  # subject -> the built profile's fingerprint (None: built by this run)
    for pair in baselines + plan.runnable:
        target = next(t for t in recipe.targets if t.name == pair.target)
        subject = f"{pair.format}@{pair.target}"
        profiles[subject] = None
        if pair.format not in checkpoints:
            row("build", subject, False, f"its {pair.format} checkpoint is (re)quantized first")
            continue
        try:
            toolchain = backends.get(target.backend).toolchain_versions()
        except Exception as exc:  # noqa: BLE001 - e.g. TensorRT-LLM not installed on the planning machine
            row("build", subject, False, f"runs on the target's worker ({type(exc).__name__}: {exc})")
            continue
        parts = build.key_parts(checkpoint_fp=checkpoints[pair.format], fmt=pair.format, target=target,
                                arch=pair.arch, toolchain=toolchain)
        out = build.out_dir(recipe.model.slug, pair.format, pair.arch, target.tp, parts)
        siblings = [p for p in out.parent.parent.glob("*/*") if p != out]
        cached, reason = explain(out, siblings, parts)
        row("build", subject, cached, reason, _estimate(siblings, cached))
        if cached:
            profiles[subject] = store.read_manifest(out)["content_hash"]
    _validation_rows(row, recipe, calib_out, calib, profiles, device)
    _decision_rows(row, recipe, plan)
    return rows


def _estimate(siblings: list[Path], cached: bool) -> float | None:
    """Seconds the newest earlier output of this stage and subject took (its manifest's `seconds`)."""
    if cached:
        return None
    timed = [(p.stat().st_mtime, m["seconds"]) for p in siblings
             if (m := store.read_manifest(p)) and isinstance(m.get("seconds"), (int, float))]
    return max(timed)[1] if timed else None


def _validation_rows(row, recipe, calib_out: Path, calib: dict, profiles: dict, device: dict) -> None:
    """accuracy and latency per built profile, keyed by the stages' own `cache_key` from the profile fingerprint
    in its build manifest, with the latency load and the skip rule the flow applies (flows/target.py); a profile this
    run builds gives keys nobody can know yet."""
    from tasks.decisions import gates
    from tasks.validation import accuracy, latency

    inputs, items = None, {}
    for stage in ("accuracy", "latency"):
        for subject, fp in profiles.items():
            if fp is None:
                row(stage, subject, False, "after its build", _stage_estimate(stage))
                continue
            fmt, target_name = subject.split("@", 1)
            if stage == "accuracy":
                if inputs is None:
                    inputs = accuracy.task_inputs(recipe.evaluation.tasks, str(calib_out / "holdout.parquet"),
                                                  recipe.evaluation.limit)
                key = accuracy.cache_key(profile_fp=fp, spec=recipe.evaluation, inputs=inputs)
            else:
                target = next(t for t in recipe.targets if t.name == target_name)
                note = gates.latency_note(backends.get(target.backend), recipe.gates)
                spec, _ = gates.latency_load(recipe.latency, recipe.gates, note)
                key = latency.cache_key(profile_fp=fp, spec=spec, holdout_digest=calib["holdout_digest"],
                                        device=device)
            out = store.stage_dir(stage, key)
            cached = store.read_manifest(out) is not None
            if stage == "accuracy" and cached:
                items[subject] = str(out / "items.parquet")
            base = items.get(f"{BASELINE}@{target_name}")
            if (stage == "latency" and not cached and fmt != BASELINE and base and subject in items
                    and (why := gates.latency_not_needed(baseline_items_file=base, candidate_items_file=items[subject],
                                                         gates=recipe.gates))):
                rows_reason = f"not measured: {why} (its accuracy gate fails on the recorded items)"
                row(stage, subject, True, rows_reason)
                continue
            row(stage, subject, cached, "cache hit" if cached else "not measured with these inputs "
                "(evaluation/latency spec, held-out items, harness or machine)", _stage_estimate(stage))


def _stage_estimate(stage: str) -> float | None:
    """The newest recorded time of any output of this stage in the store."""
    return _estimate(list((store.home() / stage).glob("*")), False)


def _decision_rows(row, recipe, plan) -> None:
    """Gates and promotion are never cached: cheap, recomputed from the measurements on every run."""
    for pair in plan.runnable:
        row("gate", f"{pair.format}@{pair.target}", False, "always: verdicts from the measurements (never cached)")
    for target in recipe.targets:
        if target.name not in plan.unplaced:
            row("promote", target.name, False, "always: the ladder's choice; a registered profile keeps its version")


def _downstream(row, recipe, plan, why: str) -> None:
    """Every later stage, when an earlier one reruns: each runs on outputs nobody has yet."""
    for fmt in plan.formats_to_quantize:
        row("quantize", fmt, False, why, _estimate(list((store.home() / "quantized" / fmt).glob("*")), False))
    subjects = [f"{BASELINE}@{n}" for n in plan.target_arch if n not in plan.unplaced]
    subjects += [f"{p.format}@{p.target}" for p in plan.runnable]
    for subject in subjects:
        row("build", subject, False, f"after quantize ({why})")
    for stage in ("accuracy", "latency"):
        for subject in subjects:
            row(stage, subject, False, "after its build", _stage_estimate(stage))
    _decision_rows(row, recipe, plan)
