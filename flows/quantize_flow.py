"""The quantize flow: import, calibrate and quantize a recipe's formats on the work pool the recipe names for it
(`quantization.work_pool`, e.g. a pool of GPU hosts), publishing every output to the shared artifact store.

A certify flow run on another pool starts this flow's deployment and waits for it (:func:`quantize_elsewhere`), then
runs the same stage functions, which find the checkpoints by their content keys in the artifact store instead of
quantizing again. Hosts share no disk: only the Prefect server and MLflow's artifact store.
"""

from __future__ import annotations

import logging

from prefect import flow

from flows.prepare import check_calibration, prepare, quantize_formats, resolve_inputs
from flows.stages import RunRecord
from registry import artifact_share
from tasks import store
from tasks.backends import target_runtime
from tasks.base.settings import settings
from tasks.decisions.targets import make_plan
from tasks.host import machine

log = logging.getLogger("enginewright")


@flow(name="quantize", log_prints=True)
def quantize_checkpoints(recipe_path: str, overrides: list[str] | None = None, model_location: str | None = None,
                         model_version: str | None = None) -> dict:
    """Import, calibrate and quantize every format the recipe's targets can use; outputs go to the artifact store.

    Args: as for the certify flow.
    """
    recipe, base_dir = resolve_inputs(recipe_path, overrides, model_location, model_version, None)
    plan = make_plan(recipe, machine.local_device(), runtime_of=target_runtime)
    store.sweep_temporaries()
    shared = artifact_share.enable()
    record = RunRecord()
    model, calib = prepare(recipe, base_dir, record)
    check_calibration(recipe, model, calib, record, log_run=False)  # `action: stop` raises here, before quantizing
    quantized, errors = quantize_formats(recipe, plan, model, calib, record)
    return {"quantized": {fmt: q.fingerprint for fmt, q in quantized.items()}, "errors": errors,
            "stages": record.stages, "shared": shared}


def quantize_elsewhere(recipe_path: str, overrides, model_location, model_version) -> None:
    """When the recipe quantizes on another pool, run its quantize deployment there and wait for it.

    Raises:
        RuntimeError: the quantize flow run did not complete (its state and message say why).
    """
    env = settings()  # set by `enginewright deploy` in the job environment of a recipe's deployments
    name, pool = env.quantize_deployment, env.quantize_pool
    if not name or pool == env.work_pool:
        return
    from prefect.deployments import run_deployment

    log.info("quantizing on pool %s (%s); waiting for it", pool, name)
    run = run_deployment(name, parameters={"recipe_path": recipe_path, "overrides": overrides or [],
                                           "model_location": model_location, "model_version": model_version},
                         timeout=None)
    if not run.state.is_completed():
        raise RuntimeError(f"quantization on pool {pool} ({name}, flow run {run.name}) ended "
                           f"{run.state.name}: {run.state.message}")
