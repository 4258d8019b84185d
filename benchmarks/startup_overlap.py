"""Start-up of `enginewright run` before its first stage: the flow's imports and Prefect's temporary server one after
the other (`sequential`, as before) or overlapped (`overlap`, what the CLI now does), in a throw-away home.

    PYTHONPATH=. .venv/bin/python benchmarks/startup_overlap.py overlap
"""

import os
import sys
import tempfile
import time


def main(mode: str) -> None:
    t0 = time.perf_counter()
    home = tempfile.mkdtemp(prefix="ew-start-")
    os.environ.update(ENGINEWRIGHT_HOME=home, PREFECT_HOME=home + "/prefect", PREFECT_SERVER_EPHEMERAL_ENABLED="true",
                      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    os.environ.pop("PREFECT_API_URL", None)
    from flows import cli

    thread = cli._start_temporary_server() if mode == "overlap" else None
    import flows.cleanup  # noqa: F401
    import flows.pipeline  # noqa: F401

    imported = time.perf_counter() - t0
    from prefect.server.api.server import SubprocessASGIServer

    if thread is not None:
        thread.join()
    else:
        SubprocessASGIServer().start()
    print(f"{mode}: imports done {imported:.1f} s, server up {time.perf_counter() - t0:.1f} s, "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", file=sys.__stderr__)
    SubprocessASGIServer().stop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "overlap")
