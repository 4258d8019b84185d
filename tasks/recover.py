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
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tasks import quantize, store
from tasks.serving_cost import SERVING_COST

log = logging.getLogger(__name__)

AUTO_QUANTIZE = "auto_quantize"
QAT_SUFFIX = "+qat"
GIB = 2**30


class RecoveryError(RuntimeError):
    """A recovery rung cannot run as configured (memory, an infeasible budget, no training data)."""


@dataclass(frozen=True)
class RecoveredArtifact:
    format: str  # the rung's name: auto_quantize, or <format>+qat
    method: str  # auto_quantize | qat
    path: str
    fakequant_dir: str
    unified_dir: str
    fingerprint: str
    quant_algo: str | None
    awq_block_size: int | None
    seconds: float
    recovered_from: str
    cost_format: str  # the format whose kernels and activation bits its serving cost takes
    weight_bits: float | None  # effective weight bits (AutoQuantize's result); None: the cost format's
    config: dict = field(default_factory=dict)  # the budget or the training config
    loss_curve: list = field(default_factory=list)  # qat: distillation loss per step
    cached: bool = False

    def lineage(self) -> dict:
        return {"recovery_method": self.method, "recovered_from": self.recovered_from, "cost_format": self.cost_format,
                "weight_bits": self.weight_bits, "recovery_config": json.dumps(self.config, sort_keys=True)}


def qat_name(fmt: str) -> str:
    return fmt + QAT_SUFFIX


def accuracy_failed(decision) -> bool:
    """A PTQ rung whose accuracy gate (not latency) failed: the trigger for recovery."""
    return any(v.bound is not None and v.verdict == "fail" and v.decides for v in decision.verdicts)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _key_parts(method: str, *, model_fp: str, device: str, **inputs) -> dict:
    return {"method": method, "model": model_fp, "device": device, **inputs,
            "toolchain": {"modelopt": store.version_of("nvidia-modelopt"), "torch": store.version_of("torch"),
                          "transformers": store.version_of("transformers")},
            "code": store.source_digest(sys.modules[__name__], quantize)}


def _load(model_dir: str, device: str, *, dtype=None):
    """A base checkpoint, or a PTQ fake-quant checkpoint with its quantizers restored (tasks/quant_state.py).
    bf16 on CUDA unless `dtype` says otherwise, float32 on CPU."""
    import modelopt.torch.opt as mto
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks import quant_state

    mto.enable_huggingface_checkpointing()  # a saved quantized model (modelopt_state.pth) comes back quantized
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
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


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _probe_seconds(model, batch: dict) -> float:
    """Seconds for one forward pass of `batch` (the unit the time estimates multiply)."""
    import torch

    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})  # warm-up
        started = time.perf_counter()
        model(**{k: v for k, v in batch.items() if k != "labels"})
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - started


def _lm_batches(texts: list[str], tokenizer, *, batch_size: int, max_tokens: int, device: str) -> list[dict]:
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_tokens)
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        batches.append({**{k: v.to(device) for k, v in enc.items()}, "labels": labels.to(device)})
    return batches


def _export(model, tokenizer, tmp: Path) -> dict | None:
    """The same two checkpoints PTQ writes (tasks/quantize.py); returns the unified export's quant config.

    Trained or scored in fp32, the model is stored in the dtype PTQ stores and the reference backend loads on this
    device (bf16 on CUDA): fp32 quantizer buffers (AWQ's pre_quant_scale) met bf16 weights at load otherwise."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    model.to(torch.bfloat16 if next(model.parameters()).is_cuda else torch.float32)

    mtq.print_quant_summary(model, output_dir=str(tmp))
    model.save_pretrained(tmp / "fakequant")  # before export: export packs weights in place
    tokenizer.save_pretrained(tmp / "fakequant")
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(tmp / "unified"))
    tokenizer.save_pretrained(tmp / "unified")
    file = tmp / "unified" / "hf_quant_config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _artifact(manifest: dict, out: Path, cached: bool) -> RecoveredArtifact:
    m = manifest
    return RecoveredArtifact(m["format"], m["method"], str(out), str(out / "fakequant"), str(out / "unified"),
                             m["content_hash"], m.get("quant_algo"), m.get("awq_block_size"), m["seconds"],
                             m["recovered_from"], m["cost_format"], m.get("weight_bits"), m["config"],
                             m.get("loss_curve", []), cached)


def _cached_or_run(stage: str, key: str, run) -> RecoveredArtifact:
    out = store.stage_dir(stage, key)
    with store.claim(out) as manifest:
        cached = manifest is not None
        if manifest is None:
            manifest = run(out)
    return _artifact(manifest, out, cached)


# ---------------------------------------------------------------------------------------------- auto_quantize


def auto_quantize(*, model_dir: str, model_fp: str, calibration_file: str, calib_digest: str, spec,
                  recovered_from: str, kv_cache: str = "none", awq_block_size: int | None = None,
                  max_tokens: int = 256, batch_size: int = 8, tp_sizes=(1,)) -> RecoveredArtifact:
    """ModelOpt AutoQuantize over `spec.formats` under `spec.effective_bits`, calibrated and scored on the
    calibration set; cached by model, calibration set, candidates, budget and every setting.

    Raises:
        RecoveryError: the budget is below what the candidates can reach, or memory does not suffice.
    """
    device = _device()
    blocks = {f: quantize.resolved_block_size(f, model_dir, awq_block_size, tuple(tp_sizes)) for f in spec.formats}
    parts = _key_parts(AUTO_QUANTIZE, model_fp=model_fp, device=device, calibration=calib_digest,
                       spec=spec.model_dump(mode="json"), kv_cache=kv_cache, awq_block_sizes=blocks,
                       max_tokens=max_tokens, batch_size=batch_size)
    key = store.key_of("auto_quantize", parts)
    return _cached_or_run(f"recovered/{AUTO_QUANTIZE}", key, lambda out: _auto_quantize(
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
    model, tokenizer = _load(model_dir, device, dtype=torch.float32)
    texts = pd.read_parquet(calibration_file)["text"].tolist()
    batches = _lm_batches(texts, tokenizer, batch_size=batch_size, max_tokens=max_tokens, device=device)
    score_steps = min(spec.score_batches, len(batches))
    # weights + gradients for scoring + a calibrated copy of each candidate's quantizer state, plus activations
    tokens = batch_size * max_tokens
    need = _params(model) * 4 * 3 + tokens * model.config.vocab_size * 4 * 3
    free = check_memory(need, device, "auto_quantize", "lower calibration.batch_size or calibration.max_tokens")
    probe = _probe_seconds(model, batches[0])
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
        if "infeasible" in str(exc):
            raise RecoveryError(f"recovery.auto_quantize.effective_bits={spec.effective_bits}: {exc}") from None
        raise
    except PulpError as exc:
        if "NaN" not in str(exc):
            raise
        raise RecoveryError(f"auto_quantize: some layers' sensitivity scores are NaN/inf (non-finite gradients or "
                            f"candidate outputs on the calibration batches); try recovery.auto_quantize.method: "
                            f"kl_div ({exc})") from None
    model.eval()
    best = state.get("best", {})
    achieved = _effective_bits(best, spec.effective_bits)
    layers = {k.removesuffix(".quant_recipe"): str(v) for k, v in best.get("recipe", {}).items()}
    with store.atomic_dir(out) as tmp:
        quant_config = _export(model, tokenizer, tmp)
        (tmp / "layer_formats.json").write_text(json.dumps(layers, indent=1, sort_keys=True))
        seconds = round(time.perf_counter() - started, 2)
        cost_format = max(spec.formats, key=lambda f: (SERVING_COST[f].activation_bits, SERVING_COST[f].weight_bits))
        manifest = store.write_manifest(tmp, {
            "stage": "recover", "method": AUTO_QUANTIZE, "format": AUTO_QUANTIZE, "key": key, "inputs": parts,
            "recovered_from": recovered_from, "cost_format": cost_format, "weight_bits": achieved,
            "config": {"candidates": spec.formats, "effective_bits_budget": spec.effective_bits,
                       "effective_bits": achieved, "method": spec.method, "score_batches": score_steps,
                       "calibration_batches": len(batches), "layer_formats": _count(layers)},
            "quant_algo": (quant_config or {}).get("quantization", {}).get("quant_algo"),
            "hf_quant_config": quant_config, "seconds": seconds, "estimated_seconds": round(estimate, 1),
            "device": device, "toolchain": store.toolchain()})
    log.info("auto_quantize: %.2f effective bits (budget %.2f), %s, in %.0f s", achieved or -1, spec.effective_bits,
             _count(layers), seconds)
    return manifest


def _effective_bits(best: dict, budget: float) -> float | None:
    """AutoQuantize's achieved effective bits, from its search state (`best.constraints.effective_bits`)."""
    value = (best.get("constraints") or {}).get("effective_bits")
    try:
        return round(float(value), 3) if value is not None else None
    except (TypeError, ValueError):
        return None


def _count(layers: dict) -> dict:
    counts: dict = {}
    for recipe in layers.values():
        counts[recipe] = counts.get(recipe, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------- qat


def training_texts(spec, base_dir: Path, *, count: int, seed: int, calibration_file: str,
                   holdout_file: str) -> list[str]:
    """`count` texts from the calibration source's pool, never from its held-out split (same hash rule as
    tasks/calibrate.py); a request-log source trains on the calibration set itself. Checked against the held-out
    file before use."""
    from tasks import calibrate

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
    device = _device()
    parts = _key_parts("qat", model_fp=model_fp, device=device, calibration=calib_digest,
                       quantized=ptq.fingerprint, format=ptq.format, data=store.key_of(texts),
                       spec=spec.model_dump(mode="json"))
    key = store.key_of("qat", parts)
    return _cached_or_run(f"recovered/{qat_name(ptq.format)}", key,
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
    teacher, tokenizer = _load(model_dir, device)
    teacher.eval().requires_grad_(False)
    # fp32 master weights, bf16 compute on CUDA: AdamW steps of ~lr are below a bf16 weight's rounding step and
    # would vanish if the student itself were bf16
    student, _ = _load(ptq.fakequant_dir, device, dtype=torch.float32)
    params = _params(student)
    tokens = spec.batch_size * spec.seq_len
    layers, hidden = student.config.num_hidden_layers, student.config.hidden_size
    # teacher + student weights, gradients, AdamW's two moments; logits of both and their softmaxes; activations
    need = params * 4 * 5 + tokens * student.config.vocab_size * 4 * 4 + tokens * hidden * layers * 4 * 16
    free = check_memory(need, device, f"qat of {ptq.format}",
                        "lower recovery.qat.batch_size or recovery.qat.seq_len, or run on a larger worker")
    windows = _windows(texts, tokenizer, spec.seq_len)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(spec.seed))
    loss_fn = LogitsDistillationLoss(temperature=spec.temperature, reduction="none")
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=spec.lr)
    # a step is a teacher forward, a student forward and its backward (~2 forwards): ~4 teacher forwards
    probe = _probe_seconds(teacher, {"input_ids": windows[order[:spec.batch_size]].to(device)})
    student.train()
    curve: list[float] = []
    log.info("qat of %s on %s: %d steps x %d x %d tokens from %d windows (%d texts), lr %g; ~%.0f s estimated "
             "(one forward %.2f s); ~%.1f GiB needed of %.1f GiB free", ptq.format, device, spec.steps,
             spec.batch_size, spec.seq_len, len(windows), len(texts), spec.lr, 4 * probe * spec.steps, probe,
             need / GIB, free)
    for step in range(spec.steps):
        picks = [order[(step * spec.batch_size + j) % len(windows)] for j in range(spec.batch_size)]
        batch = windows[torch.stack(picks)].to(device)
        t0 = time.perf_counter()
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
            log.info("qat of %s: ~%.0f s estimated for %d steps (first step %.1f s)", ptq.format,
                     (time.perf_counter() - t0) * spec.steps, spec.steps, time.perf_counter() - t0)
        if (step + 1) % max(1, spec.steps // 10) == 0 or step + 1 == spec.steps:
            log.info("qat of %s: step %d/%d, KL %.4f, %.0f s elapsed", ptq.format, step + 1, spec.steps, curve[-1],
                     time.perf_counter() - started)
    student.eval()
    del teacher, optimizer
    name = qat_name(ptq.format)
    with store.atomic_dir(out) as tmp:
        quant_config = _export(student, tokenizer, tmp)
        (tmp / "loss_curve.json").write_text(json.dumps(curve))
        seconds = round(time.perf_counter() - started, 2)
        manifest = store.write_manifest(tmp, {
            "stage": "recover", "method": "qat", "format": name, "key": key, "inputs": parts,
            "recovered_from": ptq.format, "cost_format": ptq.format, "weight_bits": None,
            "awq_block_size": ptq.awq_block_size,
            "config": spec.model_dump(mode="json") | {"texts": len(texts), "windows": len(windows),
                                                      "loss": "KL(teacher || student) on logits"},
            "loss_curve": curve, "quant_algo": (quant_config or {}).get("quantization", {}).get("quant_algo"),
            "hf_quant_config": quant_config, "seconds": seconds, "device": device, "toolchain": store.toolchain()})
    log.info("qat of %s: KL %.4f -> %.4f over %d steps in %.0f s", ptq.format, curve[0], curve[-1], spec.steps,
             seconds)
    return manifest


# ------------------------------------------------------------------------------------------------ the ladder


def recovery_rungs(recipe, base_dir, failed_format: str, ptq, target, arch: str, model, calib, *, timed):
    """The recovery rungs the recipe asks for after `failed_format` failed an accuracy gate on this target, in order,
    as (name, make): make() returns the RecoveredArtifact, or the reason the rung was skipped. Lazy, so the ladder
    can stop before a rung it no longer needs. `timed(stage, subject, fn, **kwargs)` runs and records a stage."""
    from tasks.backends.reference import MODEL_LOCK  # in-process model compute is serialised (see that module)
    from tasks.targets import invalid_reason

    spec, cal = recipe.recovery, recipe.calibration
    if spec.auto_quantize is not None:
        aq = spec.auto_quantize

        def make_auto_quantize():
            bad = {f: why for f in aq.formats if (why := invalid_reason(f, arch, backend=target.backend,
                                                                        quant_device=_device(), engine=target.engine))}
            if bad:
                return "auto_quantize candidates not valid here: " + "; ".join(f"{f}: {w}" for f, w in bad.items())
            try:
                with MODEL_LOCK:
                    return timed("recover", f"{AUTO_QUANTIZE}@{target.name}", auto_quantize, model_dir=model.path,
                                 model_fp=model.fingerprint, calibration_file=calib.calibration_file,
                                 calib_digest=calib.digest, spec=aq, recovered_from=failed_format,
                                 kv_cache=recipe.quantization.kv_cache,
                                 awq_block_size=recipe.quantization.awq_block_size, max_tokens=cal.max_tokens,
                                 batch_size=cal.batch_size, tp_sizes=quantize.recipe_tp_sizes(recipe))
            except RecoveryError as exc:
                return str(exc)
            except Exception as exc:  # noqa: BLE001 -- one failing rung never takes the others down
                log.exception("auto_quantize for %s on %s failed", failed_format, target.name)
                return f"auto_quantize failed: {type(exc).__name__}: {exc}"

        yield AUTO_QUANTIZE, make_auto_quantize
    if spec.qat is not None:

        def make_qat():
            try:
                texts = training_texts(cal, base_dir, count=spec.qat.samples, seed=spec.qat.seed,
                                       calibration_file=calib.calibration_file, holdout_file=calib.holdout_file)
                with MODEL_LOCK:
                    return timed("recover", f"{qat_name(failed_format)}@{target.name}", qat, model_dir=model.path,
                                 model_fp=model.fingerprint, ptq=ptq, texts=texts, calib_digest=calib.digest,
                                 spec=spec.qat)
            except RecoveryError as exc:
                return str(exc)
            except Exception as exc:  # noqa: BLE001 -- one failing rung never takes the others down
                log.exception("qat of %s on %s failed", failed_format, target.name)
                return f"qat failed: {type(exc).__name__}: {exc}"

        yield qat_name(failed_format), make_qat
