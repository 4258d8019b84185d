"""trtllm-serve on a trtllm profile: the command line, and a context manager that starts it with the profile's
autotuner cache, waits for /health and stops it. Part of the trtllm backend (tasks/backends/trtllm/)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tasks.backends.trtllm.common import (
    AUTOTUNER_ENV,
    CHECKPOINT,
    ENGINE,
    INSTALL_HINT,
    OPTIONS_FILE,
    BackendUnavailable,
    TrtllmError,
    import_trtllm,
    is_legacy,
    stage_autotuner_cache,
)

SERVE_STARTUP_TIMEOUT_S = 900.0  # model load, autotuning and CUDA-graph capture of a large model take minutes
SERVE_STOP_GRACE_S = 30.0
HEALTH_POLL_S = 1.0


def serve_command(profile_dir: Path, *, host: str, port: int, executable: str = "trtllm-serve") -> list[str]:
    """The trtllm-serve command line for a profile (commands/serve.py; reference section 3.4).

    Limits come from the options file (trtllm-serve applies it over its defaults) or, for an engine, from the
    engine itself; no limit is repeated as a flag.
    """
    profile = Path(profile_dir)
    checkpoint = profile / CHECKPOINT
    needed = [profile / ENGINE / "config.json", checkpoint] if is_legacy(profile) else [checkpoint,
                                                                                         profile / OPTIONS_FILE]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise TrtllmError(f"{profile} is not a complete trtllm profile: missing {', '.join(missing)}")
    common = ["--host", host, "--port", str(port)]
    if is_legacy(profile):
        return [executable, str(profile / ENGINE), *common, "--backend", "tensorrt", "--tokenizer", str(checkpoint)]
    return [executable, str(checkpoint), *common, "--backend", "pytorch",
            "--extra_llm_api_options", str(profile / OPTIONS_FILE)]


def serve(profile_dir: Path, *, host: str = "127.0.0.1", port: int, log_file: Path,
          startup_timeout: float = SERVE_STARTUP_TIMEOUT_S):
    """A context manager: start trtllm-serve on the profile, wait for GET /health to answer 200, yield the
    OpenAI-compatible base URL (http://host:port/v1), and stop the server on exit. Its output goes to log_file."""
    import_trtllm()
    executable = shutil.which("trtllm-serve")
    if executable is None:
        raise BackendUnavailable(f"trtllm-serve is not on PATH (it is installed with tensorrt_llm). {INSTALL_HINT}")
    reachable = "127.0.0.1" if host in ("0.0.0.0", "") else host
    command = serve_command(Path(profile_dir), host=host, port=port, executable=executable)
    return _serving(command, Path(profile_dir), f"http://{reachable}:{port}", Path(log_file), startup_timeout)


@contextlib.contextmanager
def _serving(command: list[str], profile: Path, url: str, log_file: Path, timeout: float) -> Iterator[str]:
    from tasks.backends.serving import run_server

    with tempfile.TemporaryDirectory(prefix="trtllm-serve-") as scratch:
        env = dict(os.environ)
        cache = stage_autotuner_cache(profile, Path(scratch))
        if cache is not None:
            env[AUTOTUNER_ENV] = str(cache)
        with run_server(command, health_url=f"{url}/health", log_file=log_file, timeout_s=timeout, env=env,
                        name="trtllm-serve", error=TrtllmError, stop_grace_s=SERVE_STOP_GRACE_S,
                        poll_s=HEALTH_POLL_S):
            yield f"{url}/v1"
