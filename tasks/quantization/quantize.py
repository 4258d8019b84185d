"""Quantize: ModelOpt post-training quantization of the imported checkpoint on the calibration set.

Writes per format:
  - ``unified/``: ModelOpt's unified HF export (``hf_quant_config.json``), what TensorRT-LLM loads;
  - ``fakequant/``: the base checkpoint's files hard-linked (no copy) plus ModelOpt's quantizer state
    (tasks/models/quant_state.py: a few MB, byte-deterministic); the reference backend restores the state onto the base
    weights and computes exactly what the in-memory quantized model computed.
INT8-SmoothQuant gets ``trtllm-tp{N}/`` instead of ``unified/``: a TensorRT-LLM checkpoint per legacy-engine tp
(see TRTLLM_CHECKPOINT_FORMATS).
The model is placed by tasks/models/placement.py: one GPU, or sharded over the visible GPUs when it does not fit one.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks import store
from tasks.base.errors import BadInput
from tasks.host import machine
from tasks.models import placement, quant_state, warmup
from tasks.store import hashed_export

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
# TensorRT-LLM's INT4 group-wise kernels take group size 64 or 128, and every rank's share of a layer's input must be
# whole groups (TensorRT-LLM issues #988, #1636; ModelOpt's export cannot pack a partial block either:
# "Cannot pack weight with input dimension 320 and block size 128: partial blocks are not supported").
AWQ_GROUP_SIZES = (128, 64)
# ModelOpt's KV-cache presets by their hf_ptq.py --kv_cache_qformat names (modelopt.recipe.presets, 0.47): the
# *_cast ones pin a constant amax (448, use_constant_amax) and calibrate nothing; ModelOpt's default is fp8_cast.
KV_CACHE_FORMATS = ("fp8_cast", "fp8", "nvfp4_cast", "nvfp4")
# INT8-SmoothQuant is exported as a TensorRT-LLM checkpoint per tensor-parallel size, as ModelOpt's hf_ptq.py does
# (export_tensorrt_llm_checkpoint): the unified HF export does not support it (3_unified_hf.rst lists FP8, FP8_PB,
# NVFP4, NVFP4_AWQ, INT4_AWQ, W4A8_AWQ) and only TensorRT-LLM's legacy engine serves it.
TRTLLM_CHECKPOINT_FORMATS = ("int8_sq",)
EXPORT_SHARD_SIZE = "1GB"  # smaller than ModelOpt's 10GB default: each shard is hashed while the next is written
CUDA_ONLY_FORMATS = {"nvfp4": "NVFP4 calibration uses ModelOpt's CUDA kernels; run quantization on a GPU worker"}


class QuantizationError(BadInput):
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
    """Input size of every layer ModelOpt quantizes: nn.Linear and transformers' Conv1D (GPT-2's attention and MLP,
    whose weight is stored (in, out)); lm_head is left unquantized."""
    import torch
    from transformers.pytorch_utils import Conv1D

    sizes = {}
    for name, m in model.named_modules():
        if "lm_head" in name:
            continue
        if isinstance(m, torch.nn.Linear):
            sizes[name] = m.in_features
        elif isinstance(m, Conv1D):
            sizes[name] = m.weight.shape[0]
    return sizes


def choose_awq_block_size(in_features: dict[str, int], requested: int | None, tp_sizes=(1,)) -> int:
    """The AWQ group size: `requested`, else 128 when it fits, else 64. A size fits when, for every target's tensor
    parallelism, each layer's input size per rank is a whole number of groups.

    Raises:
        QuantizationError: naming the layers and sizes that no allowed group size fits (before any calibration).
    """
    if not in_features:
        raise QuantizationError("the model has no nn.Linear or Conv1D layers for AWQ to quantize")
    tps = sorted(set(tp_sizes)) or [1]

    def misfits(size: int) -> dict[str, str]:
        return {n: f"{f}" + (f" / tp {tp} = {f / tp:g}" if tp > 1 else "") for n, f in in_features.items()
                for tp in tps if f % (tp * size)}

    for size in ([requested] if requested is not None else AWQ_GROUP_SIZES):
        bad = misfits(size)
        if not bad:
            return size
    listed = ", ".join(f"{n} ({why})" for n, why in list(bad.items())[:6]) + (" ..." if len(bad) > 6 else "")
    tried = f"quantization.awq_block_size={requested}" if requested is not None else "AWQ group size 128 or 64"
    raise QuantizationError(
        f"{tried} does not give whole groups per rank (tensor parallelism {', '.join(map(str, tps))}) for "
        f"{len(bad)} layer(s): {listed}. TensorRT-LLM's INT4 kernels take group size 64 or 128, with each rank's "
        f"input size a multiple of it; use another format for this model, or a tp that divides the sizes")


def calibration_forward(model, batches) -> int:
    """ModelOpt hf_ptq's calibration loop (modelopt/torch/utils/dataset_utils.py _forward_loop/_process_batch):
    no gradients, no KV cache (use_cache=False); a batch that runs out of CUDA memory is split in half and retried,
    and later batches are cut to the size that worked. Returns that size (the first batch's when none failed).

    Raises:
        QuantizationError: a single sample does not fit in GPU memory.
    """
    import torch

    limit: list[int | None] = [None]

    def run(batch: dict) -> None:
        n = batch["input_ids"].shape[0]
        if limit[0] is not None and n > limit[0]:
            for i in range(0, n, limit[0]):
                run({k: v[i:i + limit[0]] for k, v in batch.items()})
            return
        try:
            model(**batch, use_cache=False)
            return
        except torch.cuda.OutOfMemoryError:
            if n == 1:
                raise QuantizationError("calibration ran out of CUDA memory on a single sample: lower "
                                        "calibration.max_tokens or quantize on a GPU with more memory") from None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = (n + 1) // 2
        log.warning("calibration: CUDA out of memory with batch size %d, trying %d", n, half)
        limit[0] = half
        run({k: v[:half] for k, v in batch.items()})
        run({k: v[half:] for k, v in batch.items()})

    first = None
    with torch.no_grad():
        for batch in batches:
            first = first or batch["input_ids"].shape[0]
            run(batch)
    return limit[0] or first or 0


def build_quant_config(fmt: str, *, kv_cache: str, awq_block_size: int | None) -> dict:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, MODELOPT_PRESETS[fmt]))
    if fmt in AWQ_FORMATS:
        for entry in cfg["quant_cfg"]:
            parts = entry.get("cfg")
            for part in parts if isinstance(parts, list) else [parts]:
                if isinstance(part, dict) and isinstance(part.get("block_sizes"), dict) and -1 in part["block_sizes"]:
                    part["block_sizes"][-1] = awq_block_size
    if kv_cache != "none":
        from modelopt.recipe.presets import KV_QUANT_CFG_CHOICES

        if kv_cache not in KV_CACHE_FORMATS or kv_cache not in KV_QUANT_CFG_CHOICES:
            raise QuantizationError(f"quantization.kv_cache '{kv_cache}' is not one of none, "
                                    f"{', '.join(KV_CACHE_FORMATS)} (ModelOpt's KV presets)")
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, KV_QUANT_CFG_CHOICES[kv_cache]["quant_cfg"])
    return cfg


def key_parts(*, model_fp: str, calib_digest: str, fmt: str, kv_cache: str, awq_block_size: int | None,
              max_tokens: int, batch_size: int, device: str, trtllm_tps=()) -> dict:
    """Everything a quantized checkpoint depends on, by name (recorded in its manifest; `plan` diffs them)."""
    parts = {"model": model_fp, "calibration": calib_digest, "format": fmt, "kv_cache": kv_cache,
             "awq_block_size": awq_block_size, "max_tokens": max_tokens, "batch_size": batch_size, "device": device,
             "toolchain": {"modelopt": machine.version_of("nvidia-modelopt"), "torch": machine.version_of("torch"),
                           "transformers": machine.version_of("transformers")},
             "code": store.source_digest(sys.modules[__name__], quant_state, hashed_export)}
    if fmt in TRTLLM_CHECKPOINT_FORMATS:
        parts["trtllm_checkpoint_tps"] = trtllm_checkpoint_tps(fmt, trtllm_tps)
    return parts


def trtllm_checkpoint_tps(fmt: str, tps) -> list[int]:
    return sorted(set(tps) or {1}) if fmt in TRTLLM_CHECKPOINT_FORMATS else []


def trtllm_checkpoint_dir(path, tp: int) -> Path:
    return Path(path) / f"trtllm-tp{tp}"


def resolved_block_size(fmt: str, model_dir: str, requested: int | None, tp_sizes=(1,)) -> int | None:
    if fmt not in AWQ_FORMATS:
        return None
    return choose_awq_block_size(_linear_sizes_from_config(model_dir), requested, tp_sizes)


def work_device() -> str:
    """Where quantization runs in this process (part of its cache key)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def out_dir(fmt: str, parts: dict) -> Path:
    """Where the checkpoint of these key parts is stored."""
    return store.stage_dir(f"quantized/{fmt}", store.key_of("quantize", parts))


def quantize(*, model_dir: str, model_fp: str, calibration_file: str, calib_digest: str, fmt: str,
             kv_cache: str = "none", awq_block_size: int | None = None, max_tokens: int = 256,
             batch_size: int = 8, tp_sizes=(1,), trtllm_tps=()) -> QuantizedArtifact:
    """Quantize with ModelOpt and export; cached by model, calibration set, format config and toolchain.

    tp_sizes: every target's tensor parallelism (the AWQ group size must fit each); trtllm_tps: those of the
    legacy-engine targets, for which INT8-SQ is exported as a TensorRT-LLM checkpoint.

    Raises:
        QuantizationError: the format cannot run here (e.g. NVFP4 without CUDA) or does not fit the model.
    """
    device = work_device()
    if fmt in CUDA_ONLY_FORMATS and device != "cuda":
        raise QuantizationError(f"{fmt}: {CUDA_ONLY_FORMATS[fmt]}")
    if kv_cache.startswith("nvfp4") and device != "cuda":
        raise QuantizationError(f"kv_cache {kv_cache}: NVFP4 KV-cache quantization uses ModelOpt's CUDA kernels; "
                                f"run quantization on a GPU worker")
    awq_block_size = resolved_block_size(fmt, model_dir, awq_block_size, tp_sizes)
    parts = key_parts(model_fp=model_fp, calib_digest=calib_digest, fmt=fmt, kv_cache=kv_cache,
                      awq_block_size=awq_block_size, max_tokens=max_tokens, batch_size=batch_size, device=device,
                      trtllm_tps=trtllm_tps)
    key = store.key_of("quantize", parts)
    out = out_dir(fmt, parts)
    manifest, cached = store.reuse_or_make(out, lambda out: _quantize_and_export(
        model_dir, calibration_file, fmt, kv_cache, awq_block_size, max_tokens, batch_size, device, key, out, parts,
        parts.get("trtllm_checkpoint_tps", [])))
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
                         device, key, out, parts, trtllm_tps) -> dict:
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
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # saved with the export as it came
    # Calibration pads on the left, with EOS where the tokenizer has no pad token (hf_ptq does the same and restores
    # the tokenizer before saving it): a separate copy, so the saved tokenizer keeps its own pad token.
    calib_tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if calib_tokenizer.pad_token is None:
        calib_tokenizer.pad_token = calib_tokenizer.eos_token
    calib = pd.read_parquet(calibration_file)
    texts = calib["text"].tolist()
    # tasks/calibration/calibrate.py pack: equal-length token sequences, no padding
    packed = "input_ids" in calib.columns
    if packed:
        import numpy as np

        packed_ids = torch.from_numpy(np.stack(calib["input_ids"].to_numpy()).astype(np.int64))
    cfg = build_quant_config(fmt, kv_cache=kv_cache, awq_block_size=awq_block_size)

    def batch_at(i: int) -> dict:
        if packed:
            return {"input_ids": packed_ids[i:i + batch_size].to(input_device)}
        return calib_tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                               max_length=max_tokens).to(input_device)

    def forward_loop(m):
        starts = range(0, len(texts), batch_size)
        calibration_forward(m, tqdm((batch_at(i) for i in starts), total=len(starts), desc=f"calibrate {fmt}",
                                    unit="batch"))

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
        shard_digests: dict = {}
        if trtllm_tps:
            quant_config = _export_trtllm_checkpoints(model, tokenizer, tmp, trtllm_tps)
        else:
            # Shards are hashed as each is written, while the next is written (no second read of the export).
            with hashed_export.hashing_shard_writes(tmp) as shard_digests, torch.inference_mode():
                export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(tmp / "unified"),
                                     max_shard_size=EXPORT_SHARD_SIZE)
            tokenizer.save_pretrained(tmp / "unified")
            quant_config = _read_json(tmp / "unified" / "hf_quant_config.json")
        del model
        seconds = round(time.perf_counter() - started, 2)
        manifest = store.write_manifest(tmp, {
            "stage": "quantize", "key": key, "inputs": parts, "format": fmt, "kv_cache": kv_cache,
            "awq_block_size": awq_block_size,
            "device": device, "placement": where.describe(), "seconds": seconds, "toolchain": machine.toolchain(),
            "quant_algo": (quant_config or {}).get("quantization", {}).get("quant_algo"),
            "hf_quant_config": quant_config,
        }, files=shard_digests)
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
                        "ENGINEWRIGHT_HOME on the model's filesystem to avoid this copy.", file,
                        file.stat().st_size / 1e9)
            shutil.copy2(file, out / file.name)


def _export_trtllm_checkpoints(model, tokenizer, out: Path, tps) -> dict:
    """One TensorRT-LLM checkpoint per tensor-parallel size (config.json + rank{N}.safetensors), with the tokenizer,
    as hf_ptq.py exports int8_sq; returns the quantization block of the first one's config.json."""
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from modelopt.torch.export.model_utils import get_model_type

    decoder_type = get_model_type(model)
    if decoder_type is None:
        raise QuantizationError(f"ModelOpt's TensorRT-LLM checkpoint export does not know {type(model).__name__}")
    for tp in tps:
        target = trtllm_checkpoint_dir(out, tp)
        with torch.inference_mode():
            export_tensorrt_llm_checkpoint(model, decoder_type, dtype=torch.float16, export_dir=str(target),
                                           inference_tensor_parallel=tp)
        tokenizer.save_pretrained(target)
    return {"quantization": (_read_json(trtllm_checkpoint_dir(out, tps[0]) / "config.json") or {}).get("quantization")}


def _read_json(path: Path) -> dict | None:
    import json

    return json.loads(path.read_text()) if path.is_file() else None
