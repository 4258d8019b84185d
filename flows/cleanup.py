"""What a crash leaves behind, marked as such: MLflow runs and Prefect flow runs still RUNNING whose process is gone.

`enginewright run` calls cleanup() before it starts; `enginewright cleanup` runs it alone. Only this host's runs are
judged (tasks/host/liveness.py). A Prefect flow run started by `enginewright run` carries its process as tags
(process_tags()); runs started by workers are left to Prefect (the worker reports a crashed flow-run process).
A killed `enginewright run` also leaves Prefect's temporary API server running; cleanup() stops it.
"""

from __future__ import annotations

import contextlib
import sys

from tasks.host import liveness

TAG_PREFIXES = ("host:", "pid:", "pid-started:")


def process_tags() -> list[str]:
    """Tags naming this process, for the flow runs it starts: host:<name>, pid:<pid>, pid-started:<ticks>."""
    me = liveness.identity()
    return [f"host:{me['host']}", f"pid:{me['pid']}", f"pid-started:{me['started']}"]


def _process_of(tags: list[str]) -> dict[str, str]:
    found = {}
    for tag in tags:
        for prefix in TAG_PREFIXES:
            if tag.startswith(prefix):
                found[prefix[:-1]] = tag[len(prefix):]
    return found


def fail_abandoned_flow_runs() -> list[dict]:
    """Mark Crashed the RUNNING/PENDING flow runs (and their running task runs) of this host whose process is gone."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
    from prefect.states import Crashed

    host = liveness.identity()["host"]
    active = [StateType.RUNNING, StateType.PENDING]
    marked = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=active)),
            tags=FlowRunFilterTags(all_=[f"host:{host}"])), sort=FlowRunSort.START_TIME_ASC, limit=200)
        for run in runs:
            process = _process_of(run.tags)
            reason = liveness.gone(host, process.get("pid", ""), process.get("pid-started", ""))
            if not reason:
                continue
            message = f"abandoned: {reason}"
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                                          task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                                              type=TaskRunFilterStateType(any_=active))),
                                          sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
            for task_run in tasks:
                client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            marked.append({"flow_run_id": str(run.id), "name": run.name, "reason": reason})
    return marked


def stop_orphaned_temporary_servers() -> list[int]:
    """Stop Prefect's temporary (ephemeral) API servers whose enginewright process was killed.

    Prefect starts one per process that has no PREFECT_API_URL and stops it at exit; a SIGKILL skips that, and the
    orphan keeps its port, its database connections and its parent's stdout. Returns the pids signalled.
    """
    import os
    import signal

    if sys.platform != "linux":
        return []
    pids = [pid for pid, _ in liveness.orphans("prefect.server.api.server:create_app")
            if liveness.environ(pid).get("PREFECT__SERVER_EPHEMERAL") == "1"]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    return pids


def cleanup() -> dict[str, list]:
    """Mark this host's abandoned runs and stop orphaned temporary Prefect servers:
    {"mlflow_runs": [...], "flow_runs": [...], "servers": [pid, ...]}, each run with its reason."""
    from registry import tracking as registry

    return {"mlflow_runs": registry.fail_abandoned_runs(), "flow_runs": fail_abandoned_flow_runs(),
            "servers": stop_orphaned_temporary_servers()}
