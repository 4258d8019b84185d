"""Activation ranges for the representativeness report: each Linear layer's input abs-max on calibration texts and
on held-out texts, compared (a calibration set that misses the ranges traffic reaches calibrates the wrong scales).
Runs the model; cached by content."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from tasks import store
from tasks.host import machine


@dataclass(frozen=True)
class LayerRange:
    layer: str
    calibration_amax: float
    holdout_amax: float
    ratio: float  # larger / smaller, >= 1


def activation_ranges(model_dir: str, calibration_texts: list[str], holdout_texts: list[str], *, max_tokens: int,
                      batch_size: int) -> tuple[LayerRange, ...]:
    """Input abs-max of every Linear layer (but lm_head) on each text set; most different layers first."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    state: dict = {}

    def hook(name):
        def record(module, args):
            x, mask = args[0], state["mask"]
            if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]
            if x.numel():
                state["amax"][name] = max(state["amax"][name], float(x.detach().abs().max()))
        return record

    def run(texts: list[str]) -> dict[str, float]:
        state["amax"] = dict.fromkeys(linears, 0.0)
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=max_tokens).to(device)
            state["mask"] = batch["attention_mask"].bool()
            with torch.no_grad():
                model(**batch)
        return state["amax"]

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        calib, held = run(calibration_texts), run(holdout_texts)
    finally:
        for h in handles:
            h.remove()
    rows = [LayerRange(n, round(calib[n], 6), round(held[n], 6),
                       round(max(calib[n], held[n]) / max(min(calib[n], held[n]), 1e-12), 5)) for n in linears]
    return tuple(sorted(rows, key=lambda r: (-r.ratio, r.layer)))


def _texts(path: Path, n: int, seed: int) -> list[str]:
    texts = pd.read_parquet(path)["text"].tolist() if path.is_file() else []
    return random.Random(seed).sample(texts, n) if len(texts) > n else texts


def cached_activation_ranges(*, model_dir: str, model_fp: str, calib, spec) -> tuple[tuple[LayerRange, ...], bool]:
    """:func:`activation_ranges` on ``activation_samples`` texts per side, cached by content. Returns (rows, cached)."""
    import torch

    seed = spec.seed
    calib_texts = _texts(Path(calib.calibration_file), spec.representativeness.activation_samples, seed)
    holdout = _texts(Path(calib.holdout_file), len(calib_texts), seed)
    n = min(len(calib_texts), len(holdout))
    if n == 0:
        return (), False
    calib_texts, holdout = calib_texts[:n], holdout[:n]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    key = store.key_of("representativeness", model_fp, calib.digest, calib.holdout_digest, n, seed, spec.max_tokens,
                       spec.batch_size, device, machine.version_of("torch"), machine.version_of("transformers"),
                       store.source_digest(sys.modules[__name__]))
    out = store.stage_dir("representativeness", key)

    def make(out: Path) -> dict:
        rows = activation_ranges(model_dir, calib_texts, holdout, max_tokens=spec.max_tokens,
                                 batch_size=spec.batch_size)
        with store.atomic_dir(out) as tmp:
            (tmp / "activation_ranges.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
            return store.write_manifest(tmp, {"stage": "representativeness", "key": key, "texts_per_side": n,
                                              "layers": [asdict(r) for r in rows]})

    manifest, cached = store.reuse_or_make(out, make)
    return tuple(LayerRange(**r) for r in manifest["layers"]), cached
