"""Thin Prefect tasks over the stage functions (names, retries, a `Cached` state for cache hits), the run record,
and the one timer every stage call goes through.

Caching lives in the artifact store (tasks/store/), not in Prefect's result cache: every stage function returns at
once when its content-addressed output already exists. Prefect's cache would only hold a pointer to that output,
could not notice the output being deleted, and needs the same shared storage across workers that the store needs.
Gates and promotion are never retried: a failed gate is an answer, not a transient error.

One name per stage: the name below is the module's, the Prefect task's, the run record's and the console's.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from flows import console
from tasks import store
from tasks.calibration import calibrate
from tasks.decisions import gates
from tasks.models import import_model
from tasks.profiles import build
from tasks.quantization import quantize
from tasks.validation import accuracy, latency

log = logging.getLogger("enginewright")


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
    return value.result() if isinstance(value, State) else value


# The stages that run as Prefect tasks, each named as its stage (represent and the recovery rungs run in the flow's
# own task, timed as stages `represent` and `recover`).
import_task = stage_task(import_model.import_model, name="import")
calibrate_task = stage_task(calibrate.calibrate, name="calibrate")
quantize_task = stage_task(quantize.quantize, name="quantize")
build_task = stage_task(build.build, name="build")
accuracy_task = stage_task(accuracy.measure_accuracy, name="accuracy")
latency_task = stage_task(latency.measure_latency, name="latency")
GATE_STATE_NAMES = {"pass": "Passed", "fail": "Rejected", "undecided": "Undecided"}


def _gate(**kwargs):
    """gates.gate as a task whose state says the answer: `Passed`, `Rejected` or `Undecided` (all of type Completed:
    a gate saying no is an answer, not an error), with the decision's reason as its message."""
    decision = gates.gate(**kwargs)
    return Completed(name=GATE_STATE_NAMES[decision.status], message=decision.reason, data=decision)


gate_task = task(functools.wraps(gates.gate)(_gate), name="gate", cache_policy=NO_CACHE, retries=0)


@dataclass
class RunRecord:
    """What the run did, for the summary table, the MLflow run and the CLI's exit code. Shared by the per-target
    tasks, which run in threads: they only append to its lists and set distinct keys of its dicts."""
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


PROGRESS_AFTER_S, PROGRESS_EVERY_S = 10.0, 120.0


def timed(record: RunRecord, name: str, subject: str, fn, *args, **kwargs):
    """Run stage `name` on `subject` (a Prefect task is named "<name> <subject>") and record its time. A stage still
    running after 10 s gets a progress line (then one every 2 minutes) with the time it took when it last ran here."""
    home = store.home()
    expected = console.expected_seconds(home, name, subject)
    log.info("▶ %-9s %-28s%s", name, subject, f" (last run here: {expected:.0f} s)" if expected else "")
    started = time.perf_counter()
    done = threading.Event()

    def progress():
        wait = PROGRESS_AFTER_S
        while not done.wait(wait):
            so_far = time.perf_counter() - started
            left = f", about {max(expected - so_far, 0):.0f} s left" if expected else ""
            log.info("… %-9s %-28s %.0f s so far%s", name, subject, so_far, left)
            wait = PROGRESS_EVERY_S

    threading.Thread(target=progress, name=f"progress {name} {subject}", daemon=True).start()
    if isinstance(fn, Task):
        fn = fn.with_options(task_run_name=f"{name} {subject}")
    try:
        result = result_of(fn(*args, **kwargs))
    finally:
        done.set()
    record.stage(name, subject, started, result)
    if not getattr(result, "cached", False):
        console.remember_seconds(home, name, subject, time.perf_counter() - started)
    return result
