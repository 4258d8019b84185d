"""Quantize: ModelOpt post-training quantization of the imported checkpoint on the calibration set.

Writes per format:
  - ``unified/``: ModelOpt's unified HF export (``hf_quant_config.json``), what TensorRT-LLM loads;
  - ``fakequant/``: the base checkpoint's files hard-linked (no copy) plus ModelOpt's quantizer state
    (tasks/quant_state.py: a few MB, byte-deterministic); the reference backend restores the state onto the base
    weights and computes exactly what the in-memory quantized model computed.
The model is placed by tasks/placement.py: one GPU, or sharded over the visible GPUs when it does not fit one.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks import placement, quant_state, store, warmup

log = logging.getLogger(__name__)

# recipe format -> ModelOpt preset (modelopt.torch.quantization, 0.47)
MODELOPT_PRESETS = {
    "fp8": "FP8_DEFAULT_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "w4a8_awq": "W4A8_AWQ_BETA_CFG",
    "nvfp4": "NVFP4_DEFAULT_CFG",
}
AWQ_FORMATS = ("int4_awq", "w4a8_awq")
CUDA_ONLY_FORMATS = {"nvfp4": "NVFP4 calibration uses ModelOpt's CUDA kernels; run quantization on a GPU worker"}


class QuantizationError(ValueError):
    """The format cannot be applied to this model as configured."""


@dataclass(frozen=True)
class QuantizedArtifact:
    format: str
    path: str
    fakequant_dir: str
    unified_dir: str
    fingerprint: str
    quant_algo: str | None
    awq_block_size: int | None
    seconds: float
    cached: bool = False


def linear_in_features(model) -> dict[str, int]:
    import torch

    return {name: m.in_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name}


def choose_awq_block_size(in_features: dict[str, int], requested: int | None) -> int:
    """The requested group size if every quantized linear's input size divides by it; else the largest that works.

    Raises:
        QuantizationError: listing every layer that the requested size does not divide.
    """
    if requested is not None:
        bad = {n: f for n, f in in_features.items() if f % requested}
        if bad:
            listed = ", ".join(f"{n} ({f})" for n, f in list(bad.items())[:8])
            raise QuantizationError(
                f"quantization.awq_block_size={requested} does not divide the input size of {len(bad)} layer(s): "
                f"{listed}{' ...' if len(bad) > 8 else ''}. Use a divisor of every size, or leave it unset to choose one.")
        return requested
    for size in (128, 64, 32, 16):
        if all(f % size == 0 for f in in_features.values()):
            return size
    raise QuantizationError(f"no AWQ group size in 128/64/32/16 divides every linear input size: {sorted(set(in_features.values()))}")


def build_quant_config(fmt: str, *, kv_cache: str, awq_block_size: int | None) -> dict:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, MODELOPT_PRESETS[fmt]))
    if fmt in AWQ_FORMATS:
        for entry in cfg["quant_cfg"]:
            parts = entry.get("cfg")
            for part in parts if isinstance(parts, list) else [parts]:
                if isinstance(part, dict) and isinstance(part.get("block_sizes"), dict) and -1 in part["block_sizes"]:
                    part["block_sizes"][-1] = awq_block_size
    if kv_cache == "fp8":
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, mtq.FP8_KV_CFG["quant_cfg"])
    return cfg


def key_parts(*, model_fp: str, calib_digest: str, fmt: str, kv_cache: str, awq_block_size: int | None,
              max_tokens: int, batch_size: int, device: str) -> dict:
    """Everything a quantized checkpoint depends on, by name (recorded in its manifest; `plan` diffs them)."""
    return {"model": model_fp, "calibration": calib_digest, "format": fmt, "kv_cache": kv_cache,
            "awq_block_size": awq_block_size, "max_tokens": max_tokens, "batch_size": batch_size, "device": device,
            "toolchain": {"modelopt": store.version_of("nvidia-modelopt"), "torch": store.version_of("torch"),
                          "transformers": store.version_of("transformers")},
            "code": store.source_digest(sys.modules[__name__], quant_state)}


def resolved_block_size(fmt: str, model_dir: str, requested: int | None) -> int | None:
    return choose_awq_block_size(_linear_sizes_from_config(model_dir), requested) if fmt in AWQ_FORMATS else None


def quantize(*, model_dir: str, model_fp: str, calibration_file: str, calib_digest: str, fmt: str,
             kv_cache: str = "none", awq_block_size: int | None = None, max_tokens: int = 256,
             batch_size: int = 8) -> QuantizedArtifact:
    """Quantize with ModelOpt and export; cached by model, calibration set, format config and toolchain.

    Raises:
        QuantizationError: the format cannot run here (e.g. NVFP4 without CUDA) or does not fit the model.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if fmt in CUDA_ONLY_FORMATS and device != "cuda":
        raise QuantizationError(f"{fmt}: {CUDA_ONLY_FORMATS[fmt]}")
    awq_block_size = resolved_block_size(fmt, model_dir, awq_block_size)
    parts = key_parts(model_fp=model_fp, calib_digest=calib_digest, fmt=fmt, kv_cache=kv_cache,
                      awq_block_size=awq_block_size, max_tokens=max_tokens, batch_size=batch_size, device=device)
    key = store.key_of("quantize", parts)
    out = store.stage_dir(f"quantized/{fmt}", key)
    with store.claim(out) as manifest:
        cached = manifest is not None
        if manifest is None:
            manifest = _quantize_and_export(model_dir, calibration_file, fmt, kv_cache, awq_block_size, max_tokens,
                                            batch_size, device, key, out, parts)
    return QuantizedArtifact(fmt, str(out), str(out / "fakequant"), str(out / "unified"), manifest["content_hash"],
                             manifest.get("quant_algo"), awq_block_size, manifest["seconds"], cached)


def _linear_sizes_from_config(model_dir: str) -> dict[str, int]:
    """Linear input sizes from the config alone (a meta-device model: no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return linear_in_features(model)


def _quantize_and_export(model_dir, calibration_file, fmt, kv_cache, awq_block_size, max_tokens, batch_size,
                         device, key, out, parts) -> dict:
    import time

    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from tqdm import tqdm
    from transformers import AutoTokenizer

    started = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    where = placement.plan(model_dir, dtype=dtype, device=device, what=f"{Path(model_dir).name} ({fmt})")
    model = placement.load_causal_lm(model_dir, dtype=dtype, placement=where)
    model.config.architectures = [type(model).__name__]
    input_device = placement.input_device(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    calib = pd.read_parquet(calibration_file)
    texts = calib["text"].tolist()
    packed = "input_ids" in calib.columns  # tasks/calibrate.py pack: equal-length token sequences, no padding
    cfg = build_quant_config(fmt, kv_cache=kv_cache, awq_block_size=awq_block_size)

    def forward_loop(m):
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            for i in tqdm(range(0, len(texts), batch_size), desc=f"calibrate {fmt}", unit="batch"):
                if packed:
                    ids = torch.tensor(calib["input_ids"].iloc[i:i + batch_size].tolist(), device=input_device)
                    batch = {"input_ids": ids}
                else:
                    batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                                      max_length=max_tokens).to(input_device)
                with torch.no_grad():
                    m(**batch, use_cache=False)  # no KV cache: calibration never decodes
        finally:
            tokenizer.padding_side = padding_side

    log.info("quantizing to %s on %s (%d calibration %s)", fmt, where.describe(), len(texts),
             "packed sequences" if packed else "texts")
    if device == "cuda":
        warmup.announce(f"quantize {fmt}")
    with quant_state.recording_folds() as folds:
        mtq.quantize(model, cfg, forward_loop)
    with store.atomic_dir(out) as tmp:
        mtq.print_quant_summary(model, output_dir=str(tmp))
        # The quantizer state, before export: export packs weights in place. Base files are linked, not copied.
        quant_state.save(model, tmp / "fakequant", base_fingerprint=parts["model"], folds=folds)
        link_base_checkpoint(Path(model_dir), tmp / "fakequant")
        with torch.inference_mode():
            export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(tmp / "unified"))
        tokenizer.save_pretrained(tmp / "unified")
        quant_config = _read_json(tmp / "unified" / "hf_quant_config.json")
        del model
        seconds = round(time.perf_counter() - started, 2)
        manifest = store.write_manifest(tmp, {
            "stage": "quantize", "key": key, "inputs": parts, "format": fmt, "kv_cache": kv_cache, "awq_block_size": awq_block_size,
            "device": device, "placement": where.describe(), "seconds": seconds, "toolchain": store.toolchain(),
            "quant_algo": (quant_config or {}).get("quantization", {}).get("quant_algo"),
            "hf_quant_config": quant_config,
        })
        manifest["seconds"] = round(time.perf_counter() - started, 2)  # hashing included (what the run recorded)
    log.info("%s quantized and exported in %.1f s", fmt, seconds)
    return manifest


def link_base_checkpoint(model_dir: Path, out: Path) -> None:
    """Hard-link the base checkpoint's files (weights, config, tokenizer) next to the quantizer state."""
    import os
    import shutil

    for file in sorted(model_dir.iterdir()):
        if not file.is_file() or file.name == store.MANIFEST or (out / file.name).exists():
            continue
        try:
            os.link(file, out / file.name)
        except OSError:
            log.warning("cannot hard-link %s into the store (another filesystem?): copying %.1f GB. Keep "
                        "ENGINEWRIGHT_HOME on the model's filesystem to avoid this copy.", file, file.stat().st_size / 1e9)
            shutil.copy2(file, out / file.name)


def _read_json(path: Path) -> dict | None:
    import json

    return json.loads(path.read_text()) if path.is_file() else None
