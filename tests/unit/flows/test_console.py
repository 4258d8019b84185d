"""`enginewright run`'s console: stage lines and our warnings on the console, everything else in the log file."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from flows.console import console_for_run
    with console_for_run(Path(sys.argv[1]), verbose=False) as path:
        logging.getLogger("enginewright").info("stage line")
        logging.getLogger("tasks.validation.latency").warning("our warning")
        logging.getLogger("tasks.models.import_model").info("our detail")
        logging.getLogger("transformers.modeling_utils").warning("library warning")
        print("Inserted 756 quantizers")
        os.write(2, b"Loading weights: 100%|##########|\\r")
        warnings.warn("a UserWarning")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
    print("after the run")
""")


def test_the_console_gets_stage_lines_and_our_warnings_and_the_log_file_everything(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    console = out.stderr.splitlines()
    assert console[0].startswith(f"log: {tmp_path}/logs/run-")
    assert [line.split(" ", 1)[1] for line in console[1:]] == ["stage line", "our warning"]
    assert out.stdout == "after the run\n"
    [log] = (tmp_path / "logs").glob("run-*.log")
    text = log.read_text()
    for line in ("stage line", "our warning", "our detail", "library warning", "Inserted 756 quantizers",
                 "Loading weights: 100%", "a UserWarning", "child out", "child err"):
        assert line in text


def test_a_long_stage_gets_a_progress_line_with_the_last_runs_time(monkeypatch):
    import logging
    import time

    from flows import stages

    class Keep(logging.Handler):
        records: list = []

        def emit(self, record):
            self.records.append(record.getMessage())

    keep = Keep()
    logger = logging.getLogger("enginewright")
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(keep)
    monkeypatch.setattr(stages, "PROGRESS_AFTER_S", 0.05)
    try:
        stages.timed(stages.RunRecord(), "quantize", "fp8", lambda: time.sleep(0.3) or "done")
        first = list(keep.records)
        keep.records.clear()
        stages.timed(stages.RunRecord(), "quantize", "fp8", lambda: time.sleep(0.2) or "done")
        again = list(keep.records)
    finally:
        logger.removeHandler(keep)
    assert first[0].startswith("▶ quantize") and "last run" not in first[0]
    assert any(m.startswith("… quantize") and "s so far" in m and "left" not in m for m in first)
    assert "(last run here: 0 s)" in again[0]
    assert any("s left" in m for m in again)
