"""Thin Prefect tasks over the stage functions: names, retries, nothing else.

Caching lives in the artifact store (tasks/store.py), not in Prefect's result cache: every stage function returns at
once when its content-addressed output already exists. Prefect's cache would only hold a pointer to that output,
could not notice the output being deleted, and needs the same shared storage across workers that the store needs.
Gates and promotion are never retried: a failed gate is an answer, not a transient error.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import benchmark, build, calibrate, evaluate, gates, import_model, quantize

import_task = task(import_model.import_model, name="import", cache_policy=NO_CACHE)
calibrate_task = task(calibrate.calibrate, name="calibrate", cache_policy=NO_CACHE)
quantize_task = task(quantize.quantize, name="quantize", cache_policy=NO_CACHE,
                     task_run_name="quantize-{fmt}")
build_task = task(build.build, name="build", cache_policy=NO_CACHE,
                  task_run_name="build-{fmt}-{target.name}")
evaluate_task = task(evaluate.evaluate, name="evaluate-accuracy", cache_policy=NO_CACHE)
latency_task = task(benchmark.measure_latency, name="measure-latency", cache_policy=NO_CACHE)
gate_task = task(gates.gate, name="gate", cache_policy=NO_CACHE, retries=0)
