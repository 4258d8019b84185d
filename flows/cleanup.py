"""What a crash leaves behind, marked as such: MLflow runs and Prefect flow runs still RUNNING whose process is gone.

`enginewright run` calls cleanup() before it starts; `enginewright cleanup` runs it alone. Only this host's runs are
judged (tasks/host/liveness.py). A Prefect flow run started by `enginewright run` carries its process as tags
(process_tags()); runs started by workers are left to Prefect (the worker reports a crashed flow-run process).
A killed `enginewright run` also leaves Prefect's temporary API server running (and, should their death signal fail,
model servers); cleanup() stops those of this home only (ENGINEWRIGHT_HOME in their environment), never another
home's.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from tasks.base import settings as names
from tasks.base.settings import settings
from tasks.host import liveness

log = logging.getLogger("enginewright.cleanup")

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


PREFECT_SERVER_MARKER = "prefect.server.api.server:create_app"


def _what(helper: dict) -> str | None:
    """What an orphaned helper process is, when it is a server cleanup stops: a model server (it names itself in
    ENGINEWRIGHT_SERVER, tasks/backends/serving.py) or Prefect's temporary API server; None for anything else."""
    env = helper["environ"]
    if env.get(names.SERVER):
        return f"model server {env[names.SERVER]}"
    if PREFECT_SERVER_MARKER in helper["cmdline"] and env.get("PREFECT__SERVER_EPHEMERAL") == "1":
        return "Prefect's temporary API server"
    return None


def stop_orphaned_servers() -> list[dict]:
    """Stop the servers that runs of THIS home left when they were killed: Prefect's temporary API servers and model
    servers whose owner (ENGINEWRIGHT_OWNER) is gone and whose ENGINEWRIGHT_HOME is this home. Another home's
    servers, orphaned or not, are left to that home's cleanup (they may hold its database; they are not ours).

    Prefect starts a temporary server per process that has no PREFECT_API_URL and stops it at exit; a SIGKILL skips
    that, and the orphan keeps its port, its database and its parent's stdout. Model servers die with their parent
    (PR_SET_PDEATHSIG), so one is found here only when that failed. Returns {"pid", "what", "home", "reason"} per
    server signalled (SIGTERM).
    """
    import os
    import signal

    if sys.platform != "linux":
        return []
    ours = str(settings().home.resolve())
    stopped, others = [], 0
    for helper in liveness.orphaned_helpers():
        what = _what(helper)
        if what is None:
            continue
        if helper["home"] != ours:
            others += 1
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper["pid"], signal.SIGTERM)
            stopped.append({"pid": helper["pid"], "what": what, "home": helper["home"], "reason": helper["reason"]})
    if others:
        log.info("left alone %d orphaned server(s) of other homes", others)
    return stopped


def _prefect_has_state() -> bool:
    """Whether there can be flow runs to mark: a Prefect server is configured, or the temporary one's database (in
    PREFECT_HOME, flows/env.py) exists. Without either, starting a temporary server just to find nothing is skipped
    (it costs tens of seconds)."""
    s = settings()
    if s.prefect_api_url or s.prefect_database_url:
        return True
    prefect_home = Path(s.prefect_home).expanduser() if s.prefect_home else Path.home() / ".prefect"
    return (prefect_home / "prefect.db").exists()


def cleanup() -> dict[str, list]:
    """Stop the servers this home's killed runs orphaned (first: one may hold the Prefect database), then mark this
    host's abandoned runs: {"servers": [...], "mlflow_runs": [...], "flow_runs": [...]}, each with its reason."""
    from registry import tracking as registry

    servers = stop_orphaned_servers()
    return {"servers": servers, "mlflow_runs": registry.fail_abandoned_runs(),
            "flow_runs": fail_abandoned_flow_runs() if _prefect_has_state() else []}
