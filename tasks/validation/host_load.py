"""The host's load while a latency measurement ran, so numbers taken on a busy machine say so.

A background thread samples, every `interval_s`: the 1-minute load average, whole-machine CPU utilisation, the CPU
used by this process and its children (the client and the server under test), and on a GPU host each GPU's
utilisation and memory (NVML, else torch.cuda memory only). What the measurement itself uses is not "load"; what
other processes use is: `foreign_cpu_cores` = machine CPU busy minus our process tree's CPU, in cores.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

# Other processes using more than this share of the machine's cores on average make latency numbers unreliable
# (on a shared 2-core box the same profile's TTFT p95 moved between 0.6 s and 2.7 s: issue 14).
MAX_FOREIGN_CPU_SHARE = 0.25
# Another process holding a GPU's SMs this busy (percent) while we measure makes GPU numbers unreliable.
MAX_FOREIGN_GPU_UTIL = 10.0


@dataclass
class LoadSampler:
    interval_s: float = 0.5
    samples: list[dict] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "LoadSampler":
        import psutil

        self._me = psutil.Process()
        psutil.cpu_percent(None)  # primes the machine-wide counter
        self._last = (time.monotonic(), self._tree_cpu_seconds())
        self._gpu = _gpu_probe()
        self._thread = threading.Thread(target=self._loop, name="host-load", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sample()  # at least one sample, even for a measurement shorter than the interval

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _tree_cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:  # a child that exited between listing and reading
                continue
        return total

    def _sample(self) -> None:
        import psutil

        now, own = time.monotonic(), self._tree_cpu_seconds()
        then, own_before = self._last
        self._last = (now, own)
        cores = psutil.cpu_count() or 1
        machine = psutil.cpu_percent(None) / 100 * cores  # busy cores since the previous call
        own_cores = max(0.0, own - own_before) / max(now - then, 1e-6)
        sample = {"load_1m": os.getloadavg()[0], "cpu_busy_cores": machine, "own_cpu_cores": own_cores,
                  "foreign_cpu_cores": max(0.0, machine - own_cores)}
        sample |= self._gpu() if self._gpu else {}
        self.samples.append(sample)

    def summary(self) -> dict:
        return summarize(self.samples, cpu_count=os.cpu_count() or 1)


def summarize(samples: list[dict], *, cpu_count: int) -> dict:
    """Mean/max of each sampled quantity, and whether the load leaves the numbers reliable (with why not)."""
    out: dict = {"samples": len(samples), "cpu_count": cpu_count}
    if not samples:
        return out | {"reliable": False, "note": "no host-load samples were taken"}
    for key in samples[0]:
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            out[f"{key}_mean"] = round(sum(values) / len(values), 3)
            out[f"{key}_max"] = round(max(values), 3)
    problems = []
    share = out["foreign_cpu_cores_mean"] / cpu_count
    if share > MAX_FOREIGN_CPU_SHARE:
        problems.append(f"other processes used {out['foreign_cpu_cores_mean']:.2f} of {cpu_count} CPU cores on "
                        f"average ({share:.0%} > {MAX_FOREIGN_CPU_SHARE:.0%})")
    if out.get("gpu_foreign_util_mean", 0.0) > MAX_FOREIGN_GPU_UTIL:
        problems.append(f"other processes kept the GPU {out['gpu_foreign_util_mean']:.0f}% busy")
    out["reliable"] = not problems
    out["note"] = ("unreliable: " + "; ".join(problems)) if problems else "quiet host"
    return out


def _gpu_probe():
    """A function returning GPU utilisation/memory now, or None on a host without a GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        me = os.getpid()

        def nvml() -> dict:
            util = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
            mem = [pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**30 for h in handles]
            foreign = 0
            for h, busy in zip(handles, util):
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                if any(_is_foreign(p.pid, me) for p in procs):
                    foreign = max(foreign, busy)
            return {"gpu_util": max(util), "gpu_mem_used_gib": max(mem), "gpu_foreign_util": foreign}

        return nvml
    except Exception:  # noqa: BLE001 - no NVML: torch's view of this process's memory is what is left
        import torch

        return lambda: {"gpu_mem_used_gib": torch.cuda.memory_allocated() / 2**30}


def _is_foreign(pid: int, me: int) -> bool:
    """A GPU process that is neither us nor our child. A pid not visible here (another PID namespace, e.g. NVML
    reporting host pids inside a container) cannot be told apart, so it is not counted."""
    import psutil

    if pid == me or not psutil.pid_exists(pid):
        return False
    try:
        return not any(p.pid == me for p in psutil.Process(pid).parents())
    except psutil.Error:
        return False
