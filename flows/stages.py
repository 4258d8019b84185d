"""Thin Prefect tasks over the stage functions: names, retries, and a `Cached` state for cache hits.

Caching lives in the artifact store (tasks/store.py), not in Prefect's result cache: every stage function returns at
once when its content-addressed output already exists. Prefect's cache would only hold a pointer to that output,
could not notice the output being deleted, and needs the same shared storage across workers that the store needs.
Gates and promotion are never retried: a failed gate is an answer, not a transient error.
"""

from __future__ import annotations

import functools

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from tasks import benchmark, build, calibrate, evaluate, gates, import_model, quantize


def stage_task(fn, **options):
    """A stage as a Prefect task whose run ends in the state `Cached` (type Completed) when the store already held
    its output, so cache hits show as such in the UI. Calling it returns that State: unwrap with `result_of`."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        if getattr(result, "cached", False):
            return Completed(name="Cached", message="output found in the artifact store", data=result)
        return result
    return task(run, cache_policy=NO_CACHE, **options)


def result_of(value):
    """A stage task's value, whether it came back as the value or as its Cached state."""
    from prefect.states import State

    return value.result() if isinstance(value, State) else value


import_task = stage_task(import_model.import_model, name="import")
calibrate_task = stage_task(calibrate.calibrate, name="calibrate")
quantize_task = stage_task(quantize.quantize, name="quantize", task_run_name="quantize {fmt}")
build_task = stage_task(build.build, name="build", task_run_name="build {fmt}@{target.name}")
evaluate_task = stage_task(evaluate.evaluate, name="evaluate")
latency_task = stage_task(benchmark.measure_latency, name="latency")
gate_task = task(gates.gate, name="gate", cache_policy=NO_CACHE, retries=0)
