"""What `enginewright run` prints: by default one line per stage start and end (with its time), a progress line with
an estimate for a stage still running after 10 s, our warnings, and the summary. Everything else any library writes
(transformers, lm-eval, ModelOpt, tqdm's bars, Prefect's and MLflow's own console lines, a model server's output)
goes to a log file in the home, whose path is printed first. `--verbose` prints it all, as before.

The split is made at the file descriptors (1 and 2 point at the log file while the flow runs; the console keeps a
duplicate of the original stderr), so output written before any handler could be configured, by C extensions or by
child processes, lands in the log file too. Prefect's API log handler and MLflow's records are not touched: they
keep everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator

OURS = ("enginewright", "tasks", "registry", "flows", "recipes")
FORMAT, DATEFMT = "%(asctime)s %(message)s", "%H:%M:%S"


class ConsoleFilter(logging.Filter):
    """The stage lines (logger `enginewright`, INFO and up) and warnings from our own packages."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "enginewright" or record.name.startswith("enginewright."):
            return True
        return record.name.split(".")[0] in OURS and record.levelno >= logging.WARNING


def log_path(home: Path) -> Path:
    return home / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextlib.contextmanager
def console_for_run(home: Path, *, verbose: bool) -> Iterator[Path | None]:
    """Route output for the run's duration; yields the log file (None with verbose)."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format=FORMAT, datefmt=DATEFMT)
        yield None
        return
    path = log_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    print(f"log: {path}  (library output and progress bars; --verbose prints them here)", file=console)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    to_file = logging.StreamHandler(sys.stderr)  # fd 2: the log file, everything
    to_console = logging.StreamHandler(console)
    to_console.addFilter(ConsoleFilter())
    for handler in (to_file, to_console):
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        root.addHandler(handler)
    try:
        yield path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        root.removeHandler(to_file)  # what is logged after the run (the summary's own lines) goes to the console


HISTORY = "stage_seconds.json"


def expected_seconds(home: Path, stage: str, subject: str) -> float | None:
    """How long this stage on this subject took the last time it ran here (not a cache hit), if it did."""
    try:
        return json.loads((home / HISTORY).read_text()).get(f"{stage} {subject}")
    except (OSError, ValueError):
        return None


def remember_seconds(home: Path, stage: str, subject: str, seconds: float) -> None:
    """Record a stage's time for the next run's estimate (last writer wins; a lost update only costs an estimate)."""
    path = home / HISTORY
    try:
        home.mkdir(parents=True, exist_ok=True)
        known = json.loads(path.read_text()) if path.is_file() else {}
        known[f"{stage} {subject}"] = round(seconds, 1)
        tmp = path.with_name(f".{HISTORY}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass
