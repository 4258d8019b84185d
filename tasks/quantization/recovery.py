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

The two stages are auto_quantize.py and qat.py beside this module, which holds what they share (the artifact, cache
keys, export) and imports neither; loading and the memory check are tasks/models/runtime.py; which rung runs when
is the flow's (flows/target.py).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tasks import store
from tasks.host import machine
from tasks.quantization import quantize

log = logging.getLogger(__name__)

AUTO_QUANTIZE = "auto_quantize"
QAT_SUFFIX = "+qat"


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


def key_parts(method: str, *, stage, model_fp: str, device: str, **inputs) -> dict:
    """A recovery stage's cache-key inputs: its own, the toolchain, and the code of the stage module `stage`, this
    module and PTQ's (whose configs and export it shares)."""
    return {"method": method, "model": model_fp, "device": device, **inputs,
            "toolchain": {"modelopt": machine.version_of("nvidia-modelopt"), "torch": machine.version_of("torch"),
                          "transformers": machine.version_of("transformers")},
            "code": store.source_digest(stage, sys.modules[__name__], quantize)}


def export_checkpoints(model, tokenizer, tmp: Path, *, dtype) -> dict | None:
    """The same two checkpoints PTQ writes (tasks/quantization/quantize.py); returns the unified export's quant config.

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
