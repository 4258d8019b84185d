"""The trtllm backend's build: TensorRT-LLM profiles built on, and for, one GPU architecture.

Runs on a GPU worker inside NVIDIA's TensorRT-LLM container. `targets[].engine` picks what a profile holds:

* ``profile`` (default; TensorRT-LLM >= 1.2, PyTorch runtime): ``checkpoint/`` (the ModelOpt unified HF export,
  hard-linked), ``extra_llm_api_options.yaml`` (runtime options under their LlmArgs names) and ``autotuner/`` (the
  autotuner cache TensorRT-LLM produced on the target GPU).
* ``legacy`` (pinned TensorRT-LLM <= 1.3.0rc20, the last release with the TensorRT backend): ``engine/``
  (``rank*.engine`` + ``config.json``, built by ``tensorrt_llm._tensorrt_engine.LLM`` with a ``BuildConfig`` and
  written by ``llm.save``) and ``checkpoint/`` for the tokenizer. INT8-SmoothQuant arrives as a TensorRT-LLM
  checkpoint exported for the target's tp (ModelOpt's export_tensorrt_llm_checkpoint), everything else as the
  unified HF export.

Which format, architecture, engine kind and release combine is tasks/decisions/targets.py's rule table; the build checks
it again against the TensorRT-LLM actually installed on the worker.

API facts come from the shared reference trtllm-modelopt.md (section 3) and TensorRT-LLM's sources, cited where
used. Nothing here has run against a real TensorRT-LLM: tests/unit/test_trtllm_backend.py checks the calls, names
and files against a fake `tensorrt_llm` (tests/fakes). `tensorrt_llm` is imported inside functions only, so this
module imports, and fails with BackendUnavailable, where it is not installed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tasks import store
from tasks.backends.serving import dies_with_parent, tail
from tasks.backends.trtllm.common import (
    AUTOTUNER,
    AUTOTUNER_ENV,
    AUTOTUNER_FILE,
    CHECKPOINT,
    ENGINE,
    OPTIONS_FILE,
    RUNTIME_LEGACY,
    RUNTIME_PYTORCH,
    TrtllmError,
    engine_llm_class,
    import_trtllm,
    legacy_build_config,
    llm_kwargs,
    read_quant_config,
    runtime_options,
    target_runtime,
    trtllm_checkpoint_config,
    warmup_batches,
)
from tasks.decisions.targets import FORMAT_OF_QUANT_ALGO, KV_OF_QUANT_ALGO, arch_of, engine_reason, invalid_reason

log = logging.getLogger(__name__)


BUILD_LOG = "build.log"

WARMUP_TOKENS = 8
WARMUP_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Quantization reduces the memory",
                  "Once upon a time")

def _check_target(target, device: dict, quant: dict | None, release: str, checkpoint: Path) -> None:
    """Refuse, before any GPU time, what TensorRT-LLM would refuse later or what would be built for the wrong GPU:
    the rule table of tasks/decisions/targets.py, checked against the TensorRT-LLM release installed here."""
    where = f"target '{target.name}'"
    if device.get("device") != "cuda":
        raise TrtllmError(f"{where}: TensorRT-LLM builds on the target GPU; this worker is {device.get('arch')} "
                          f"(no CUDA device). Set targets[].work_pool to a pool of GPU workers.")
    if target.gpu != "auto" and arch_of(target.gpu) != device["arch"]:
        raise TrtllmError(f"{where} is for {arch_of(target.gpu)} ({target.gpu}) but this worker's GPU is "
                          f"{device['arch']} ({device.get('gpu_name')}); run it on a worker that has that GPU")
    if target.tp > (device.get("gpu_count") or 0):
        raise TrtllmError(f"{where}: tp={target.tp} needs {target.tp} GPUs; this worker has "
                          f"{device.get('gpu_count') or 0}")
    algo = (quant or {}).get("quant_algo")
    kv = (quant or {}).get("kv_cache_quant_algo")
    if algo and algo not in FORMAT_OF_QUANT_ALGO:
        raise TrtllmError(f"{where}: quant_algo {algo} of {checkpoint} is none of the formats this pipeline "
                          f"certifies ({', '.join(FORMAT_OF_QUANT_ALGO)})")
    why = invalid_reason(FORMAT_OF_QUANT_ALGO[algo], device["arch"], runtime=target_runtime(target, release),
                         quant_device="cuda", kv_cache=KV_OF_QUANT_ALGO.get(kv, "none")) if algo else None
    if why is None and not algo:  # an unquantized checkpoint (the baseline): the engine kind still needs its release
        why = engine_reason(target.engine, release)
    if why:
        raise TrtllmError(f"{where} on this worker (TensorRT-LLM {release}): {why}")
    if target.engine == "legacy":
        trt = trtllm_checkpoint_config(checkpoint)
        exported_for = None if trt is None else trt["mapping"].get("world_size")
        if algo == "W8A8_SQ_PER_CHANNEL" and exported_for != target.tp:
            what = "a unified HF export" if trt is None else f"exported for world_size {exported_for}"
            raise TrtllmError(f"{where}: INT8-SmoothQuant on a legacy engine is built from a TensorRT-LLM checkpoint "
                              f"exported for tp={target.tp} (ModelOpt export_tensorrt_llm_checkpoint, as hf_ptq.py "
                              f"does); {checkpoint} is {what}")
        if target.kv_cache_dtype != "auto" and kv != "FP8":
            raise TrtllmError(f"{where}: kv_cache_dtype '{target.kv_cache_dtype}' on a legacy engine comes from the "
                              f"checkpoint (kv_cache_quant_algo is {kv}); quantize with quantization.kv_cache: "
                              f"fp8_cast, or set kv_cache_dtype: auto")


def build_profile(*, checkpoint_dir: str, target, device: dict, out: Path) -> dict:
    """Write the profile into `out` and return the build options recorded in the manifest.

    The model is loaded and warmed up on this worker's GPU in a child process (see _run_build_worker).
    """
    trtllm = import_trtllm()
    out = Path(out)
    quant = read_quant_config(Path(checkpoint_dir))
    _check_target(target, device, quant, str(trtllm.__version__), Path(checkpoint_dir))
    if target.engine == "legacy":
        engine_llm_class(trtllm)  # fail before linking or loading anything
    store.link_or_copy_tree(Path(checkpoint_dir), out / CHECKPOINT)
    recorded = {
        "backend": "trtllm",
        "runtime": RUNTIME_LEGACY if target.engine == "legacy" else RUNTIME_PYTORCH,
        "tensorrt_llm": str(trtllm.__version__),
        "gpu": {k: device.get(k) for k in ("arch", "gpu_name", "gpu_count", "gpu_memory_gib", "driver", "cuda")},
        "tp": target.tp,
        "quantization": quant,
        "build_log": BUILD_LOG,
    }
    if target.engine == "legacy":
        return recorded | _build_legacy(target, out)
    return recorded | _build_pytorch(target, out)


def _build_pytorch(target, out: Path) -> dict:
    options = runtime_options(target)
    (out / OPTIONS_FILE).write_text(yaml.safe_dump(options, sort_keys=True))
    cache = out / AUTOTUNER / AUTOTUNER_FILE
    cache.parent.mkdir()
    result = _run_build_worker({"runtime": RUNTIME_PYTORCH, "checkpoint": str(out / CHECKPOINT), "options": options,
                                "warmup_batches": warmup_batches(target.max_batch_size)},
                               out, env={AUTOTUNER_ENV: str(cache)})
    files = sorted(p.relative_to(out).as_posix() for p in cache.parent.iterdir() if p.is_file())
    note = None
    if not files:
        cache.parent.rmdir()
        note = (f"TensorRT-LLM wrote no autotuner cache to ${AUTOTUNER_ENV} (autotuner disabled, nothing tunable "
                f"in this model, or a release without the variable); trtllm-serve will tune at start-up")
        log.warning("target %s: %s", target.name, note)
    return {"options_file": OPTIONS_FILE, "llm_api_options": options, "autotuner_cache": files or None,
            "autotuner_note": note, "warmup": result["warmup"]}


def _build_legacy(target, out: Path) -> dict:
    build_config = legacy_build_config(target)
    engine = out / ENGINE
    result = _run_build_worker({"runtime": RUNTIME_LEGACY, "checkpoint": str(out / CHECKPOINT),
                                "engine_dir": str(engine), "tp": target.tp, "build_config": build_config,
                                "warmup_batches": warmup_batches(target.max_batch_size)}, out, env={})
    missing = [name for name in ["config.json"] + [f"rank{r}.engine" for r in range(target.tp)]
               if not (engine / name).is_file()]
    if missing:
        raise TrtllmError(f"llm.save({engine}) wrote no {', '.join(missing)} for tp={target.tp}; last lines of "
                          f"{BUILD_LOG}:\n{tail(out / BUILD_LOG, 40)}")
    config = json.loads((engine / "config.json").read_text())
    return {"build_config": build_config, "engine_dir": ENGINE, "engine_version": config.get("version"),
            "engine_files": sorted(p.name for p in engine.iterdir()), "warmup": result["warmup"]}


def _run_build_worker(request: dict, out: Path, *, env: dict) -> dict:
    """Load and warm up the model in a fresh Python process; return what it reports.

    A fresh process because TensorRT-LLM's executor runs in MPI-spawned workers that see the environment of the
    process's start, not variables set later (TensorRT-LLM's own tests patch MpiPoolSession to pass them): the
    autotuner cache path must be in the environment before tensorrt_llm is imported. It also returns the GPU memory
    when the build ends, whatever happens inside. The child's output goes to build.log in the profile.
    """
    project_root = str(Path(__file__).resolve().parents[3])
    python_path = [project_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    child_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(python_path)}
    log_file = out / BUILD_LOG
    with tempfile.TemporaryDirectory(prefix="trtllm-build-") as scratch:
        request_file, result_file = Path(scratch) / "request.json", Path(scratch) / "result.json"
        request_file.write_text(json.dumps({**request, "result": str(result_file)}))
        # stopped by the kernel if this process dies mid-build (as model servers are: tasks/backends/serving.py)
        command = dies_with_parent(
            [sys.executable, "-m", "tasks.backends.trtllm.build", "build-worker", str(request_file)], child_env)
        with open(log_file, "wb") as logf:
            code = subprocess.run(command, stdout=logf, stderr=subprocess.STDOUT, env=child_env, cwd=scratch).returncode
        if code != 0 or not result_file.is_file():
            raise TrtllmError(f"TensorRT-LLM {request['runtime']} build of {request['checkpoint']} failed "
                              f"(exit code {code}); last lines of {log_file.name}:\n{tail(log_file, 40)}")
        return json.loads(result_file.read_text())


def _build_worker(request: dict) -> dict:
    """In the child: load with the LLM API, (legacy) save the engine, warm up, shut down."""
    trtllm = import_trtllm()
    if request["runtime"] == RUNTIME_PYTORCH:
        llm = trtllm.LLM(model=request["checkpoint"], **llm_kwargs(request["options"]))
    else:
        llm = engine_llm_class(trtllm)(model=request["checkpoint"], tokenizer=request["checkpoint"],
                                        tensor_parallel_size=request["tp"],
                                        build_config=trtllm.BuildConfig(**request["build_config"]))
    try:
        if request["runtime"] == RUNTIME_LEGACY:
            llm.save(request["engine_dir"])
        return {"warmup": _warm_up(trtllm, llm, request["warmup_batches"])}
    finally:
        llm.shutdown()


def _warm_up(trtllm, llm, batches: list[int]) -> list[dict]:
    """A few generate calls at the batch sizes serving will use: the profile must run before it exists."""
    params = trtllm.SamplingParams(max_tokens=WARMUP_TOKENS)
    calls = []
    for n in batches:
        prompts = [WARMUP_PROMPTS[i % len(WARMUP_PROMPTS)] for i in range(n)]
        outputs = llm.generate(prompts, sampling_params=params)
        generated = [len(o.outputs[0].token_ids) for o in outputs]
        if not all(generated):
            raise TrtllmError(f"warm-up: {generated.count(0)} of {n} prompts generated no token")
        calls.append({"prompts": n, "max_tokens": WARMUP_TOKENS, "generated_tokens": sum(generated)})
    return calls


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "build-worker":
        print("usage: python -m tasks.backends.trtllm.build build-worker REQUEST.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    request = json.loads(Path(argv[1]).read_text())
    result = _build_worker(request)
    Path(request["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
