"""Recovery rung ``<format>+qat``: quantization-aware distillation. The failed PTQ checkpoint (fake-quant,
straight-through gradients) is trained for N steps to match the unquantized model's logits (KL, ModelOpt's
``LogitsDistillationLoss``) on texts from the calibration source's non-held-out pool. Shared pieces are in
tasks/quantization/recovery.py."""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path

import pandas as pd

from tasks import store
from tasks.host import machine
from tasks.models import runtime
from tasks.models.runtime import GIB
from tasks.quantization import recovery as recover
from tasks.quantization.recovery import RecoveredArtifact, RecoveryError, qat_name

log = logging.getLogger(__name__)


def training_texts(spec, base_dir: Path, *, count: int, seed: int, calibration_file: str,
                   holdout_file: str) -> list[str]:
    """`count` texts from the calibration source's pool, never from its held-out split (same hash rule as
    tasks/calibration/calibrate.py); a request-log source trains on the calibration set itself. Checked against the
    held-out file before use."""
    from tasks.calibration import calibrate

    if spec.source == "request_log":
        texts = pd.read_parquet(calibration_file)["text"].tolist()
    else:
        loaders = {"pydoc_topics": calibrate._pydoc_paragraphs, "files": lambda: calibrate._file_texts(spec, base_dir),
                   "hub": lambda: calibrate._hub_texts(spec)}
        normalised = (calibrate._normalise(t) for t in loaders[spec.source]() if t and t.strip())
        pool = [t for t in dict.fromkeys(normalised) if len(t) >= spec.min_chars
                and not calibrate.is_holdout(t, spec.seed, spec.holdout_fraction)]
        texts = random.Random(seed).sample(pool, min(count, len(pool)))
    held_out = set(pd.read_parquet(holdout_file)["text"])
    leaked = [t for t in texts if t in held_out]
    if leaked:
        raise RecoveryError(f"qat: {len(leaked)} training text(s) are in the held-out split; refusing to train")
    if not texts:
        raise RecoveryError("qat: no training texts left outside the held-out split")
    return texts


def qat(*, model_dir: str, model_fp: str, ptq, texts: list[str], calib_digest: str, spec) -> RecoveredArtifact:
    """Distil the failed PTQ checkpoint `ptq` (a QuantizedArtifact) from the unquantized model for `spec.steps`
    steps; cached by base model, PTQ checkpoint, training texts and every hyper-parameter.

    Raises:
        RecoveryError: memory does not suffice for the batch, or the texts are too short for one sequence.
    """
    device = runtime.work_device()
    parts = recover.key_parts("qat", stage=sys.modules[__name__], model_fp=model_fp, device=device,
                              calibration=calib_digest, quantized=ptq.fingerprint, format=ptq.format,
                              data=store.key_of(texts), spec=spec.model_dump(mode="json"))
    key = store.key_of("qat", parts)
    return recover.cached_or_run(f"recovered/{qat_name(ptq.format)}", key,
                          lambda out: _qat(model_dir, ptq, texts, spec, device, key, parts, out))


def _windows(texts: list[str], tokenizer, seq_len: int):
    import torch

    eos = tokenizer.eos_token_id
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]]
    n = len(ids) // seq_len
    if n == 0:
        raise RecoveryError(f"recovery.qat.seq_len={seq_len} is longer than all training text ({len(ids)} tokens)")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


def _qat(model_dir, ptq, texts, spec, device, key, parts, out) -> dict:
    import modelopt.torch.quantization as mtq  # noqa: F401  (registers the quantized modules before loading)
    import torch
    from modelopt.torch.distill import LogitsDistillationLoss

    started = time.perf_counter()
    teacher, tokenizer = runtime.load_model(model_dir, device)
    teacher.eval().requires_grad_(False)
    # fp32 master weights, bf16 compute on CUDA: AdamW steps of ~lr are below a bf16 weight's rounding step and
    # would vanish if the student itself were bf16
    student, _ = runtime.load_model(ptq.fakequant_dir, device, dtype=torch.float32)
    params = runtime.param_count(student)
    tokens = spec.batch_size * spec.seq_len
    layers, hidden = student.config.num_hidden_layers, student.config.hidden_size
    # teacher + student weights, gradients, AdamW's two moments; logits of both and their softmaxes; activations
    need = params * 4 * 5 + tokens * student.config.vocab_size * 4 * 4 + tokens * hidden * layers * 4 * 16
    free = runtime.check_memory(need, device, f"qat of {ptq.format}",
                        "lower recovery.qat.batch_size or recovery.qat.seq_len, or run on a larger worker")
    windows = _windows(texts, tokenizer, spec.seq_len)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(spec.seed))
    loss_fn = LogitsDistillationLoss(temperature=spec.temperature, reduction="none")
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=spec.lr)
    # a step is a teacher forward, a student forward and its backward (~2 forwards): ~4 teacher forwards
    probe = runtime.probe_seconds(teacher, {"input_ids": windows[order[:spec.batch_size]].to(device)})
    student.train()
    curve: list[float] = []
    log.info("qat of %s on %s: %d steps x %d x %d tokens from %d windows (%d texts), lr %g; ~%.0f s estimated "
             "(rough: 4 forwards of %.2f s per step); ~%.1f GiB needed of %.1f GiB free", ptq.format, device,
             spec.steps, spec.batch_size, spec.seq_len, len(windows), len(texts), spec.lr, 4 * probe * spec.steps,
             probe, need / GIB, free)
    for step in range(spec.steps):
        picks = [order[(step * spec.batch_size + j) % len(windows)] for j in range(spec.batch_size)]
        batch = windows[torch.stack(picks)].to(device)
        if step == 0:
            t_first = time.perf_counter()
        with torch.no_grad():
            target = teacher(input_ids=batch).logits
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = student(input_ids=batch).logits
        loss = loss_fn(logits.float(), target.float()).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(round(loss.item(), 6))
        if step == 0:
            first_done = time.perf_counter()
        elif step == 2 and spec.steps > 3:  # the first step warms up kernels and allocators: time the next two
            per_step = (time.perf_counter() - first_done) / 2
            log.info("qat of %s: ~%.0f s estimated for the remaining %d steps (%.2f s per step; first step %.1f s)",
                     ptq.format, per_step * (spec.steps - 3), spec.steps - 3, per_step, first_done - t_first)
        if (step + 1) % max(1, spec.steps // 10) == 0 or step + 1 == spec.steps:
            log.info("qat of %s: step %d/%d, KL %.4f, %.0f s elapsed", ptq.format, step + 1, spec.steps, curve[-1],
                     time.perf_counter() - started)
    student.eval()
    del teacher, optimizer
    name = qat_name(ptq.format)
    with store.atomic_dir(out) as tmp:
        quant_config = recover.export_checkpoints(student, tokenizer, tmp, dtype=runtime.stored_dtype(device))
        (tmp / "loss_curve.json").write_text(json.dumps(curve))
        seconds = round(time.perf_counter() - started, 2)
        manifest = store.write_manifest(tmp, {
            "stage": "recover", "method": "qat", "format": name, "key": key, "inputs": parts,
            "recovered_from": ptq.format, "cost_format": ptq.format, "weight_bits": None,
            "awq_block_size": ptq.awq_block_size,
            "config": spec.model_dump(mode="json") | {"texts": len(texts), "windows": len(windows),
                                                      "loss": "KL(teacher || student) on logits"},
            "loss_curve": curve, "quant_algo": (quant_config or {}).get("quantization", {}).get("quant_algo"),
            "hf_quant_config": quant_config, "seconds": seconds, "device": device, "toolchain": machine.toolchain()})
    log.info("qat of %s: KL %.4f -> %.4f over %d steps in %.0f s", ptq.format, curve[0], curve[-1], spec.steps,
             seconds)
    return manifest
