"""Recovery rung ``auto_quantize``: ModelOpt AutoQuantize (``mtq.auto_quantize``) picks a format per layer group from
the recipe's candidates (or leaves it unquantized) under an effective-bits budget, calibrated and scored on the
calibration set only. Shared pieces (keys, loading, export, memory check) are in tasks/quantization/recovery.py."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter

import pandas as pd

from tasks import store
from tasks.decisions.serving_cost import SERVING_COST
from tasks.host import machine
from tasks.models import runtime
from tasks.models.runtime import GIB
from tasks.quantization import quantize
from tasks.quantization import recovery as recover
from tasks.quantization.recovery import AUTO_QUANTIZE, RecoveredArtifact, RecoveryError

log = logging.getLogger(__name__)


def lm_batches(texts: list[str], tokenizer, *, batch_size: int, max_tokens: int, device: str) -> list[dict]:
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_tokens)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        batches.append({**{k: v.to(device) for k, v in enc.items()}, "labels": labels.to(device)})
    return batches





def auto_quantize(*, model_dir: str, model_fp: str, calibration_file: str, calib_digest: str, spec,
                  recovered_from: str, kv_cache: str = "none", awq_block_size: int | None = None,
                  max_tokens: int = 256, batch_size: int = 8, tp_sizes=(1,)) -> RecoveredArtifact:
    """ModelOpt AutoQuantize over `spec.formats` under `spec.effective_bits`, calibrated and scored on the
    calibration set; cached by model, calibration set, candidates, budget and every setting.

    Raises:
        RecoveryError: the budget is below what the candidates can reach, or memory does not suffice.
    """
    device = runtime.work_device()
    blocks = {f: quantize.resolved_block_size(f, model_dir, awq_block_size, tuple(tp_sizes)) for f in spec.formats}
    parts = recover.key_parts(AUTO_QUANTIZE, stage=sys.modules[__name__], model_fp=model_fp, device=device,
                              calibration=calib_digest, spec=spec.model_dump(mode="json"), kv_cache=kv_cache,
                              awq_block_sizes=blocks, max_tokens=max_tokens, batch_size=batch_size)
    key = store.key_of("auto_quantize", parts)
    return recover.cached_or_run(f"recovered/{AUTO_QUANTIZE}", key, lambda out: _auto_quantize(
        model_dir, calibration_file, spec, kv_cache, blocks, max_tokens, batch_size, device, recovered_from, key,
        parts, out))


def _auto_quantize(model_dir, calibration_file, spec, kv_cache, blocks, max_tokens, batch_size, device,
                   recovered_from, key, parts, out) -> dict:
    import modelopt.torch.quantization as mtq
    import torch
    from pulp import PulpError

    min_bits = min(SERVING_COST[f].weight_bits for f in spec.formats)
    if spec.effective_bits < min_bits:
        raise RecoveryError(f"recovery.auto_quantize.effective_bits={spec.effective_bits} is below the fewest bits "
                            f"any candidate reaches ({min_bits} with {spec.formats}); raise it or add a smaller format")
    started = time.perf_counter()
    # fp32 on CUDA too: scored in bf16, the backward pass gave non-finite output gradients in some layers of a
    # 0.74 B Llama on an H200 (NaN scores, PuLP refused them); in fp32 the same model and data scored cleanly
    model, tokenizer = runtime.load_model(model_dir, device, dtype=torch.float32)
    texts = pd.read_parquet(calibration_file)["text"].tolist()
    batches = lm_batches(texts, tokenizer, batch_size=batch_size, max_tokens=max_tokens, device=device)
    score_steps = min(spec.score_batches, len(batches))
    # weights + gradients for scoring + a calibrated copy of each candidate's quantizer state, plus activations
    tokens = batch_size * max_tokens
    need = runtime.param_count(model) * 4 * 3 + tokens * model.config.vocab_size * 4 * 3
    free = runtime.check_memory(need, device, "auto_quantize", "lower calibration.batch_size or calibration.max_tokens")
    probe = runtime.probe_seconds(model, batches[0])
    awq = sum(1 for f in spec.formats if f in quantize.AWQ_FORMATS)
    # each candidate calibrates over every batch; AWQ's scale search adds about 10 forward-batch equivalents per
    # batch (measured: ~12 on SmolLM2-135M on CPU, ~0 on a 2-layer toy), then scoring: forward + backward per batch
    estimate = probe * (len(batches) * (len(spec.formats) + 10 * awq) + 3 * score_steps)
    log.info("auto_quantize on %s: candidates %s, budget %.2f effective bits, %d calibration batches, %d score "
             "batches; ~%.0f s estimated (one forward %.2f s), ~%.1f GiB needed of %.1f GiB free", device,
             spec.formats, spec.effective_bits, len(batches), score_steps, estimate, probe, need / GIB, free)
    candidates = [quantize.build_quant_config(f, kv_cache=kv_cache, awq_block_size=blocks[f]) for f in spec.formats]
    forward = (lambda m, b: m(**b)) if spec.method == "gradient" else (lambda m, b: m(**b).logits)
    try:
        model, state = mtq.auto_quantize(
            model, constraints={"effective_bits": spec.effective_bits}, quantization_formats=candidates,
            data_loader=batches, forward_step=forward,
            loss_func=(lambda output, batch: output.loss) if spec.method == "gradient" else None,
            disabled_layers=["*lm_head*"], num_calib_steps=len(batches), num_score_steps=score_steps,
            method=spec.method, verbose=False)
    except ValueError as exc:
        if _infeasible(exc):
            raise RecoveryError(f"recovery.auto_quantize.effective_bits={spec.effective_bits}: {exc}") from None
        raise
    except PulpError as exc:
        if not _non_finite_scores(exc):
            raise
        raise RecoveryError(f"auto_quantize: some layers' sensitivity scores are NaN/inf (non-finite gradients or "
                            f"candidate outputs on the calibration batches); try recovery.auto_quantize.method: "
                            f"kl_div ({exc})") from None
    model.eval()
    best = state.get("best", {})
    achieved = _effective_bits(best)
    layers = {k.removesuffix(".quant_recipe"): str(v) for k, v in best.get("recipe", {}).items()}
    layer_counts = dict(Counter(layers.values()))
    with store.atomic_dir(out) as tmp:
        quant_config = recover.export_checkpoints(model, tokenizer, tmp, dtype=runtime.stored_dtype(device))
        (tmp / "layer_formats.json").write_text(json.dumps(layers, indent=1, sort_keys=True))
        seconds = round(time.perf_counter() - started, 2)
        cost_format = max(spec.formats, key=lambda f: (SERVING_COST[f].activation_bits, SERVING_COST[f].weight_bits))
        manifest = store.write_manifest(tmp, {
            "stage": "recover", "method": AUTO_QUANTIZE, "format": AUTO_QUANTIZE, "key": key, "inputs": parts,
            "recovered_from": recovered_from, "cost_format": cost_format, "weight_bits": achieved,
            "config": {"candidates": spec.formats, "effective_bits_budget": spec.effective_bits,
                       "effective_bits": achieved, "method": spec.method, "score_batches": score_steps,
                       "calibration_batches": len(batches), "layer_formats": layer_counts},
            "quant_algo": (quant_config or {}).get("quantization", {}).get("quant_algo"),
            "hf_quant_config": quant_config, "seconds": seconds, "estimated_seconds": round(estimate, 1),
            "device": device, "toolchain": machine.toolchain()})
    log.info("auto_quantize: %.2f effective bits (budget %.2f), %s, in %.0f s", achieved or -1, spec.effective_bits,
             layer_counts, seconds)
    return manifest


def _effective_bits(best: dict) -> float | None:
    """AutoQuantize's achieved effective bits, from its search state (`best.constraints.effective_bits`)."""
    value = (best.get("constraints") or {}).get("effective_bits")
    try:
        return round(float(value), 3) if value is not None else None
    except (TypeError, ValueError):
        return None



# ModelOpt and PuLP give these no classes of their own; what each helper reads was observed on ModelOpt 0.47.0 with
# PuLP 3.x (the H200 run of 2026-12-01, benchmarks/gpu/results/h200-2026-12-01-autoquantize-dtype-probe.json).
def _infeasible(exc: ValueError) -> bool:
    """ModelOpt's search found no format mix within the effective-bits budget."""
    return "infeasible" in str(exc)


def _non_finite_scores(exc: Exception) -> bool:
    """PuLP refused NaN/inf sensitivity scores ("Cannot multiply variables with NaN/inf values")."""
    return "NaN" in str(exc)
