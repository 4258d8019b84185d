"""`vllm serve` on a profile, one engine per profile: the engine its build started stays up for that profile's
validation (accuracy, then latency), so an 8B model is loaded once per use, not once per stage (an H200 takes 80-110 s
per load: torch.compile and CUDA-graph capture). One engine runs at a time in this process, since each takes its
`gpu-memory-utilization` share of the GPU; every engine stops when its session ends or this process exits (and,
through the kernel, if it is killed: tasks/backends/serving.py)."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from tasks import store
from tasks.backends.serving import free_port, run_server
from tasks.backends.vllm.common import (
    CHECKPOINT,
    SERVE_STARTUP_TIMEOUT_S,
    VllmError,
    read_engine_args,
    serve_command,
    server_env,
    vllm_python,
)

log = logging.getLogger(__name__)

_live: dict[str, tuple[contextlib.ExitStack, str]] = {}  # engine key -> (what stops it, its base URL)
_sessions: set[str] = set()  # engine keys whose engine outlives each stage until the session ends


def engine_key(profile: Path) -> str:
    """The engine a profile needs: its checkpoint's source and its engine arguments (the same before and after the
    profile's directory is renamed into place)."""
    spec = read_engine_args(profile)
    return json.dumps([spec["checkpoint_source"], spec["args"]], sort_keys=True)


def start(profile: Path, log_file: Path) -> str:
    """The base URL of the profile's engine, starting it unless it is up."""
    key = engine_key(profile)
    if key in _live:
        return _live[key][1]
    stop_all()
    args = read_engine_args(profile)["args"]
    port = free_port()
    cmd = serve_command(vllm_python(), Path(profile) / CHECKPOINT, args, host="127.0.0.1", port=port)
    stack = contextlib.ExitStack()
    stack.enter_context(run_server(cmd, health_url=f"http://127.0.0.1:{port}/health", log_file=log_file,
                                   timeout_s=SERVE_STARTUP_TIMEOUT_S, env=server_env(profile), name="vllm",
                                   error=VllmError, stop_grace_s=30.0, poll_s=1.0))
    _live[key] = (stack, f"http://127.0.0.1:{port}/v1")
    return _live[key][1]


def stop(key: str) -> None:
    stack, _ = _live.pop(key, (None, None))
    if stack is not None:
        stack.close()


def stop_all() -> None:
    for key in list(_live):
        stop(key)


atexit.register(stop_all)


def log_path(profile: Path, role: str = "serve") -> Path:
    """Where an engine logs: never inside the profile, whose files are digested (the engine goes on writing)."""
    return store.home() / "logs" / f"vllm-{role}-{Path(profile).name.lstrip('.')}-{os.getpid()}.log"


@contextlib.contextmanager
def session(profile_dir: Path) -> Iterator[None]:
    """Within it, the profile's engine (its build's, or the first stage's) serves every stage; it stops at the end."""
    key = engine_key(Path(profile_dir))
    _sessions.add(key)
    try:
        yield
    finally:
        _sessions.discard(key)
        stop(key)


@contextlib.contextmanager
def serve(profile_dir: Path, *, host: str = "127.0.0.1", port: int | None = None,
          log_file: Path | None = None) -> Iterator[str]:
    """The profile behind vLLM's OpenAI-compatible endpoint; yields the base URL (`.../v1`). Reuses the profile's
    engine when it is up (its port then wins over `port`); an engine started here outside a session stops on exit."""
    profile = Path(profile_dir)
    key = engine_key(profile)
    started_here = key not in _live
    url = start(profile, log_file or log_path(profile))
    try:
        yield url
    finally:
        if started_here and key not in _sessions:
            stop(key)
