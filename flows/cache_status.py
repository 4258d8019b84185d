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


def explain(out: Path, siblings: list[Path], parts: dict) -> tuple[bool, str]:
    """(cached, reason): cached when `out` holds a complete artifact; else what differs from the newest sibling."""
    if store.read_manifest(out) is not None:
        return True, "cache hit"
    previous = [(p.stat().st_mtime, m) for p in siblings if (m := store.read_manifest(p)) and "inputs" in m]
    if not previous:
        return False, "never built"
    before = _flatten(max(previous, key=lambda x: x[0])[1]["inputs"])
    now = _flatten(parts)
    diffs = [f"{k}: {_short(before.get(k))} → {_short(now.get(k))}" for k in sorted(set(before) | set(now))
             if before.get(k) != now.get(k)]
    return False, "; ".join(diffs) or "inputs changed"


def plan_stages(recipe, base_dir: Path, plan, device: dict) -> list[dict]:
    """One row per stage and subject: would it run, and why. Every key and directory comes from the stage's own
    functions (`out_dir`, `cache_key`, `key_parts`), never spelled again here."""
    rows: list[dict] = []

    def row(stage, subject, cached, reason):
        rows.append({"stage": stage, "subject": subject, "action": "reuse" if cached else "run", "reason": reason})

    if recipe.model.source == "hf_dir":
        model_dir = resolve_path(recipe.model.path, base_dir)
        model_fp = import_model.fingerprint_in_place(recipe.model, base_dir)
        row("import", recipe.model.slug, True, "local checkpoint used in place")
    else:
        out = import_model.out_dir(recipe.model, base_dir)
        manifest = store.read_manifest(out)
        row("import", recipe.model.slug, manifest is not None, "cache hit" if manifest else "not converted yet")
        if manifest is None:
            row("downstream", "all", False, "every later stage runs after the model is imported")
            return rows
        model_dir, model_fp = out, manifest["content_hash"]

    calib_out = calibrate.out_dir(calibrate.cache_key(recipe.calibration, model_dir=str(model_dir),
                                                      base_dir=base_dir))
    calib = store.read_manifest(calib_out)
    row("calibrate", recipe.calibration.source, calib is not None,
        "cache hit" if calib else "source, sampling, tokenizer or code changed (or never built)")
    if calib is None:
        row("downstream", "all", False, "quantize and later stages run on the new calibration set")
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
        cached, reason = explain(out, [p for p in out.parent.glob("*") if p != out], parts)
        row("quantize", fmt, cached, reason)
        if cached:
            checkpoints[fmt] = store.read_manifest(out)["content_hash"]

    baselines = [Pair(BASELINE, name, arch) for name, arch in plan.target_arch.items() if name not in plan.unplaced]
    checkpoints[BASELINE] = model_fp
    for pair in baselines + plan.runnable:
        target = next(t for t in recipe.targets if t.name == pair.target)
        subject = f"{pair.format}@{pair.target}"
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
        row("build", subject, cached, reason)
    return rows
