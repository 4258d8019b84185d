"""Recovery rungs: what the ladder may try after a PTQ rung fails an accuracy gate, before a less aggressive format.

  - ``auto_quantize``: ModelOpt AutoQuantize (``mtq.auto_quantize``) picks a format per layer group from the
    recipe's candidates (or leaves it unquantized) under an effective-bits budget, scored on the calibration set;
  - ``<format>+qat``: quantization-aware distillation: the failed PTQ checkpoint (fake-quant, straight-through
    gradients) is trained for N steps to match the unquantized model's logits (KL, ModelOpt's
    ``LogitsDistillationLoss``), on texts from the calibration source's non-held-out pool.

Each writes the same two checkpoints as PTQ (fake-quant + unified HF export), content-addressed by the base model,
the calibration set, the training data and every hyper-parameter, and then goes through the same build, validation
and gates. Neither ever sees held-out data. CPU for small models, CUDA where present; each estimates its time and
memory before starting and refuses clearly when memory does not suffice.

The two stages are tasks/auto_quantize.py and tasks/qat.py; this module holds what they share (the artifact, cache
keys, loading, export, the memory check) and the ladder's view of them (`recovery_rungs`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks import quantize, store

log = logging.getLogger(__name__)

AUTO_QUANTIZE = "auto_quantize"
QAT_SUFFIX = "+qat"
GIB = 2**30


class RecoveryError(RuntimeError):
    """A recovery rung cannot run as configured (memory, an infeasible budget, no training data)."""


@dataclass(frozen=True, kw_only=True)
class RecoveredArtifact(quantize.QuantizedArtifact):
    """A recovery rung's checkpoint: what PTQ's artifact holds (`format` is the rung's name: auto_quantize, or
    <format>+qat), and where it came from."""

    method: str  # auto_quantize | qat
    recovered_from: str
    cost_format: str  # the format whose kernels and activation bits its serving cost takes
    weight_bits: float | None  # effective weight bits (AutoQuantize's result); None: the cost format's
    config: dict = field(default_factory=dict)  # the budget or the training config
    loss_curve: list = field(default_factory=list)  # qat: distillation loss per step

    def lineage(self) -> dict:
        return {"recovery_method": self.method, "recovered_from": self.recovered_from, "cost_format": self.cost_format,
                "weight_bits": self.weight_bits, "recovery_config": json.dumps(self.config, sort_keys=True)}


def qat_name(fmt: str) -> str:
    return fmt + QAT_SUFFIX


def accuracy_failed(decision) -> bool:
    """A PTQ rung whose accuracy gate (not latency) failed: the trigger for recovery."""
    return any(v.bound is not None and v.verdict == "fail" and v.decides for v in decision.verdicts)


def work_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def key_parts(method: str, *, stage, model_fp: str, device: str, **inputs) -> dict:
    """A recovery stage's cache-key inputs: its own, the toolchain, and the code of the stage module `stage`, this
    module and PTQ's (whose configs and export it shares)."""
    return {"method": method, "model": model_fp, "device": device, **inputs,
            "toolchain": {"modelopt": store.version_of("nvidia-modelopt"), "torch": store.version_of("torch"),
                          "transformers": store.version_of("transformers")},
            "code": store.source_digest(stage, sys.modules[__name__], quantize)}


def stored_dtype(device: str):
    """The dtype checkpoints are stored in and the reference backend loads on `device`: bf16 on CUDA, else fp32."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def load_model(model_dir: str, device: str, *, dtype=None):
    """A base checkpoint, or a PTQ fake-quant checkpoint with its quantizers restored (tasks/quant_state.py).
    bf16 on CUDA unless `dtype` says otherwise, float32 on CPU."""
    import modelopt.torch.opt as mto
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks import quant_state

    mto.enable_huggingface_checkpointing()  # a saved quantized model (modelopt_state.pth) comes back quantized
    dtype = dtype or stored_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    if quant_state.is_quant_state_dir(model_dir):
        model = quant_state.restore(model, model_dir)
    model.config.architectures = [type(model).__name__]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_memory(need_bytes: float, device: str, what: str, hint: str) -> float:
    """Refuse before starting when the estimated peak does not fit in what is free; returns the free GiB."""
    if device == "cuda":
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    if need_bytes > free:
        raise RecoveryError(f"{what} needs about {need_bytes / GIB:.1f} GiB of {device} memory, {free / GIB:.1f} GiB "
                            f"is free; {hint}")
    return free / GIB


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def probe_seconds(model, batch: dict) -> float:
    """Seconds for one forward pass of `batch` (the unit the time estimates multiply)."""
    import torch

    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})  # warm-up
        started = time.perf_counter()
        model(**{k: v for k, v in batch.items() if k != "labels"})
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - started


def export_checkpoints(model, tokenizer, tmp: Path, *, dtype) -> dict | None:
    """The same two checkpoints PTQ writes (tasks/quantize.py); returns the unified export's quant config.

    Trained or scored in fp32, the model is first cast to `dtype`, the one the checkpoint is loaded in
    (:func:`stored_dtype`): fp32 quantizer buffers (AWQ's pre_quant_scale) met bf16 weights at load otherwise."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    model.to(dtype)
    mtq.print_quant_summary(model, output_dir=str(tmp))
    model.save_pretrained(tmp / "fakequant")  # before export: export packs weights in place
    tokenizer.save_pretrained(tmp / "fakequant")
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(tmp / "unified"))
    tokenizer.save_pretrained(tmp / "unified")
    file = tmp / "unified" / "hf_quant_config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def artifact_of(manifest: dict, out: Path, cached: bool) -> RecoveredArtifact:
    m = manifest
    return RecoveredArtifact(m["format"], str(out), str(out / "fakequant"), str(out / "unified"), m["content_hash"],
                             m.get("quant_algo"), m.get("awq_block_size"), m["seconds"], cached, method=m["method"],
                             recovered_from=m["recovered_from"], cost_format=m["cost_format"],
                             weight_bits=m.get("weight_bits"), config=m["config"], loss_curve=m.get("loss_curve", []))


def cached_or_run(stage: str, key: str, run) -> RecoveredArtifact:
    out = store.stage_dir(stage, key)
    manifest, cached = store.reuse_or_make(out, run)
    return artifact_of(manifest, out, cached)


# ------------------------------------------------------------------------------------------------ the ladder


def recovery_rungs(recipe, base_dir, failed_format: str, ptq, target, arch: str, model, calib, *, timed):
    """The recovery rungs the recipe asks for after `failed_format` failed an accuracy gate on this target, in order,
    as (name, make): make() returns the RecoveredArtifact, or the reason the rung was skipped. Lazy, so the ladder
    can stop before a rung it no longer needs. `timed(stage, subject, fn, **kwargs)` runs and records a stage."""
    from tasks import auto_quantize as auto_quantize_stage
    from tasks import qat as qat_stage
    from tasks.backends.reference import (
        MODEL_LOCK,  # in-process model compute is serialised (see that module)
    )
    from tasks.targets import invalid_reason

    spec, cal = recipe.recovery, recipe.calibration
    if spec.auto_quantize is not None:
        aq = spec.auto_quantize

        def make_auto_quantize():
            bad = {f: why for f in aq.formats
                   if (why := invalid_reason(f, arch, backend=target.backend, quant_device=work_device(),
                                             engine=target.engine))}
            if bad:
                return "auto_quantize candidates not valid here: " + "; ".join(f"{f}: {w}" for f, w in bad.items())
            with MODEL_LOCK:
                return timed("recover", f"{AUTO_QUANTIZE}@{target.name}", auto_quantize_stage.auto_quantize,
                             model_dir=model.path, model_fp=model.fingerprint,
                             calibration_file=calib.calibration_file, calib_digest=calib.digest, spec=aq,
                             recovered_from=failed_format, kv_cache=recipe.quantization.kv_cache,
                             awq_block_size=recipe.quantization.awq_block_size, max_tokens=cal.max_tokens,
                             batch_size=cal.batch_size, tp_sizes=quantize.recipe_tp_sizes(recipe))

        yield AUTO_QUANTIZE, _guarded(AUTO_QUANTIZE, f"of {failed_format} on {target.name}", make_auto_quantize)
    if spec.qat is not None:

        def make_qat():
            texts = qat_stage.training_texts(cal, base_dir, count=spec.qat.samples, seed=spec.qat.seed,
                                             calibration_file=calib.calibration_file, holdout_file=calib.holdout_file)
            with MODEL_LOCK:
                return timed("recover", f"{qat_name(failed_format)}@{target.name}", qat_stage.qat,
                             model_dir=model.path, model_fp=model.fingerprint, ptq=ptq, texts=texts,
                             calib_digest=calib.digest, spec=spec.qat)

        yield qat_name(failed_format), _guarded("qat", f"of {failed_format} on {target.name}", make_qat)


def _guarded(method: str, what: str, make):
    """`make` as a rung: a RecoveryError's message, or any other failure (logged with its traceback) named, becomes
    the reason the rung was skipped; one failing rung never takes the others down."""
    def run():
        try:
            return make()
        except RecoveryError as exc:
            return str(exc)
        except Exception as exc:
            log.exception("%s %s failed", method, what)
            return f"{method} failed: {type(exc).__name__}: {exc}"
    return run
