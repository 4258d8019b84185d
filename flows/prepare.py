"""The front half both flows run (certify and quantize): the recipe as this run sees it, import, calibrate, the
calibration set's representativeness, and every format some target can use, quantized once."""

from __future__ import annotations

import logging

from flows import publish
from flows.stages import RunRecord, calibrate_task, import_task, quantize_task, timed
from recipes.load import load_recipe
from recipes.schema import RecipeError
from registry import tracking
from tasks import backends
from tasks.calibration import representativeness as rep
from tasks.decisions.targets import recipe_gpu_problems
from tasks.quantization.quantize import QuantizationError

log = logging.getLogger("enginewright")


def resolve_inputs(recipe_path: str, overrides: list[str] | None, model_location: str | None,
                   model_version: str | None, targets: list[str] | None):
    """The recipe as this run sees it: overrides, a new model version's location, and a subset of targets."""
    extra = list(overrides or [])
    if model_location or model_version:
        raw, _ = load_recipe(recipe_path, extra)
        if raw.model.source == "hub":
            extra += [f"model.id={model_location}"] if model_location else []
            extra += [f"model.revision={model_version}"] if model_version else []
        elif model_location:
            extra.append(f"model.path={model_location}")
    recipe, base_dir = load_recipe(recipe_path, extra, extra_checks=recipe_gpu_problems)
    if targets:
        unknown = sorted(set(targets) - {t.name for t in recipe.targets})
        if unknown:
            raise RecipeError(f"targets {unknown} are not in the recipe (it has {[t.name for t in recipe.targets]})")
        recipe = recipe.model_copy(update={"targets": [t for t in recipe.targets if t.name in targets]})
    return recipe, base_dir


def prepare(recipe, base_dir, record: RunRecord):
    """Import the model and build the calibration set (each cached, or fetched from the shared artifact store)."""
    model = timed(record, "import", recipe.model.slug, import_task, recipe.model, base_dir)
    calib = timed(record, "calibrate", recipe.calibration.source, calibrate_task, recipe.calibration,
                  model_dir=model.path, base_dir=base_dir)
    return model, calib


def check_calibration(recipe, model, calib, record: RunRecord, *, log_run: bool = True):
    """The calibration set's representativeness report, before any quantization: logged to MLflow and shown as
    Prefect artifacts (`log_run`); a failed threshold warns, or with `action: stop` raises RepresentativenessError
    here."""
    report = timed(record, "represent", recipe.calibration.source, rep.assess, recipe.calibration, calib,
                   model_dir=model.path, model_fp=model.fingerprint)
    if log_run:
        inputs = rep.load_inputs(calib.path)
        tracking.log_representativeness(
            record.run_id, report=report.as_dict(), markdown=report.markdown(), strata=report.strata_table(),
            layers=report.layers_table(), metrics=report.metrics(), status=report.status,
            figure=rep.figure(report, sample_tokens=inputs["sample_tokens"],
                              reference_tokens=inputs["reference_tokens"], first_n_tokens=inputs["first_n_tokens"]))
        publish.representativeness(recipe.name, report)
    for message in rep.enforce(report):
        log.warning("calibration representativeness: %s", message)
    return report


def quantize_formats(recipe, plan, model, calib, record: RunRecord) -> tuple[dict, dict]:
    """Every format some target can use, once; a format that cannot be applied is recorded with its reason."""
    quantized, quant_errors = {}, {}
    for fmt in plan.formats_to_quantize:
        try:
            quantized[fmt] = timed(record, "quantize", fmt, quantize_task, model_dir=model.path,
                                   model_fp=model.fingerprint, calibration_file=calib.calibration_file,
                                   calib_digest=calib.digest, fmt=fmt, kv_cache=recipe.quantization.kv_cache,
                                   awq_block_size=recipe.quantization.awq_block_size,
                                   max_tokens=recipe.calibration.max_tokens,
                                   batch_size=recipe.calibration.batch_size, tp_sizes=recipe.tp_sizes,
                                   trtllm_tps=backends.checkpoint_tps(recipe.targets))
        except QuantizationError as exc:
            quant_errors[fmt] = str(exc)
        except Exception as exc:  # any failure of one format is recorded; the other formats and targets go on
            log.exception("quantize %s failed", fmt)
            quant_errors[fmt] = f"quantize failed: {type(exc).__name__}: {exc}"
            record.errors.append(f"quantize {fmt}: {type(exc).__name__}: {exc}")
    return quantized, quant_errors
