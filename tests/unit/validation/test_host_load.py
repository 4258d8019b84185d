import subprocess
import sys

from tasks.validation import host_load


def test_foreign_cpu_load_makes_numbers_unreliable_and_says_so():
    quiet = [{"load_1m": 0.3, "cpu_busy_cores": 1.1, "own_cpu_cores": 1.0, "foreign_cpu_cores": 0.1}] * 3
    busy = [{"load_1m": 3.0, "cpu_busy_cores": 2.0, "own_cpu_cores": 0.8, "foreign_cpu_cores": 1.2}] * 3
    assert host_load.summarize(quiet, cpu_count=2)["reliable"]
    s = host_load.summarize(busy, cpu_count=2)
    assert not s["reliable"] and "1.20 of 2 CPU cores" in s["note"] and s["load_1m_mean"] == 3.0
    assert not host_load.summarize([], cpu_count=2)["reliable"]


def test_sampler_counts_our_children_as_own_load_not_foreign():
    with host_load.LoadSampler(interval_s=0.2) as sampler:
        child = subprocess.run([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.2: pass"])
    assert child.returncode == 0
    s = sampler.summary()
    assert s["samples"] >= 3 and {"load_1m_mean", "foreign_cpu_cores_mean", "reliable", "note"} <= set(s)
    assert s["own_cpu_cores_max"] > 0.1  # the busy child was ours (on a loaded 2-core box it gets little CPU)
