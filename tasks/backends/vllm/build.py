"""The vllm backend's build: the quantized checkpoint (hard-linked), vLLM's engine arguments as data, and a start of
the engine on it, whose own report (the quantization method it chose, its kernels, the KV cache's capacity) the
profile records. The engine stays up for the profile's validation (server.py)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from tasks import store
from tasks.backends.vllm.common import (
    CHECKPOINT,
    ENGINE_ARGS_FILE,
    ENGINE_REPORT_FILE,
    VllmError,
    engine_args,
    engine_report,
    probe,
    target_runtime,
    vllm_python,
)
from tasks.backends.vllm.server import engine_key, log_path, start, stop
from tasks.decisions.targets import FORMAT_OF_QUANT_ALGO, KV_OF_QUANT_ALGO, invalid_reason

log = logging.getLogger(__name__)

BUILD_LOG = "build.log"


def read_quant_config(checkpoint: Path) -> dict | None:
    """ModelOpt's `hf_quant_config.json` "quantization" block; None for an unquantized checkpoint."""
    file = Path(checkpoint) / "hf_quant_config.json"
    return json.loads(file.read_text()).get("quantization") if file.is_file() else None


def check_checkpoint(checkpoint: Path, target, device: dict, release: str) -> None:
    """Refuse, before the engine starts, what this vLLM does not serve here (tasks/decisions/targets.py's rules)."""
    quant = read_quant_config(checkpoint) or {}
    algo, kv = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    if algo is None:
        return
    fmt = FORMAT_OF_QUANT_ALGO.get(algo)
    why = (f"quant_algo {algo} is none of the formats this pipeline certifies" if fmt is None else
           invalid_reason(fmt, device["arch"], runtime=target_runtime(target, release),
                          quant_device=device["device"], kv_cache=KV_OF_QUANT_ALGO.get(kv, "none")))
    if why:
        raise VllmError(f"target '{target.name}' on this worker (vLLM {release}): {checkpoint}: {why}")


def build_profile(*, checkpoint_dir: str, target, device: dict, out: Path) -> dict:
    python = vllm_python()
    found = probe(python)
    checkpoint = Path(checkpoint_dir)
    check_checkpoint(checkpoint, target, device, found["vllm"])
    store.link_or_copy_tree(checkpoint, out / CHECKPOINT)
    args = engine_args(target)
    (out / ENGINE_ARGS_FILE).write_text(yaml.safe_dump(
        {"vllm": found["vllm"], "args": args, "checkpoint_source": str(checkpoint.resolve())}, sort_keys=True))
    log_file = log_path(out, "build")
    try:
        start(out, log_file)  # the build check: the engine loads this profile on this GPU, or the build fails
    except Exception:
        stop(engine_key(out))
        raise
    shutil.copyfile(log_file, out / BUILD_LOG)  # its start-up, as the profile's record (the engine logs on)
    report = engine_report((out / BUILD_LOG).read_text(errors="replace")) | {
        "vllm": found["vllm"], "vllm_dist": found["vllm_dist"]}
    (out / ENGINE_REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    log.info("vllm %s: quantization %s, kernels %s, KV cache %s tokens", target.name, report.get("quantization"),
             ", ".join(report["kernels"]) or "not named", report.get("kv_cache_tokens"))
    return {"backend": "vllm", "vllm": found["vllm"], "engine_args": args, "engine": report}
