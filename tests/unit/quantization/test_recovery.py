"""Recovery rungs on a tiny Llama: AutoQuantize and quantization-aware distillation run, export, and are cached."""

import json
from pathlib import Path

import pandas as pd
import pytest

from recipes.schema import AutoQuantizeSpec, CalibrationSpec, QatSpec
from tasks.models import runtime
from tasks.models.placement import DoesNotFit
from tasks.quantization import auto_quantize, qat, quantize
from tasks.quantization import recovery as recover


def test_auto_quantize_mixes_formats_under_the_budget_exports_and_is_cached(tiny_model_dir, calib_file):
    # lm_head stays unquantized and counts at 16 bits: on this model int4 everywhere else is 7.69 bits, fp8 10.46
    spec = AutoQuantizeSpec(formats=["int4_awq", "fp8"], effective_bits=9.0, score_batches=2)
    kw = dict(model_dir=str(tiny_model_dir), model_fp="tiny", calibration_file=calib_file, calib_digest="c1",
              spec=spec, recovered_from="int4_awq", max_tokens=64, batch_size=8)
    art = auto_quantize.auto_quantize(**kw)
    assert not art.cached and art.format == "auto_quantize" and art.recovered_from == "int4_awq"
    assert art.weight_bits is not None and 7.69 <= art.weight_bits <= 9.0
    assert (Path(art.unified_dir) / "hf_quant_config.json").is_file()
    assert (Path(art.fakequant_dir) / "modelopt_state.pth").is_file()
    assert json.loads((Path(art.path) / "layer_formats.json").read_text())
    again = auto_quantize.auto_quantize(**kw)
    assert again.cached and again.fingerprint == art.fingerprint
    assert not auto_quantize.auto_quantize(**kw | {"spec": spec.model_copy(update={"effective_bits": 10.0})}).cached


def test_auto_quantize_refuses_a_budget_below_every_candidate(tiny_model_dir, calib_file):
    spec = AutoQuantizeSpec(formats=["int4_awq", "fp8"], effective_bits=3.0)
    with pytest.raises(recover.RecoveryError, match="effective_bits=3.0 is below"):
        auto_quantize.auto_quantize(model_dir=str(tiny_model_dir), model_fp="tiny", calibration_file=calib_file,
                              calib_digest="c1", spec=spec, recovered_from="int4_awq")


def test_qat_distils_the_failed_ptq_checkpoint_and_is_cached(tiny_model_dir, calib_file):
    from pydoc_data.topics import topics

    ptq = quantize.quantize(model_dir=str(tiny_model_dir), model_fp="tiny", calibration_file=calib_file,
                            calib_digest="c1", fmt="int4_awq", max_tokens=64)
    texts = [list(topics.values())[30][:400]]  # a couple of windows: every step sees the same tokens
    spec = QatSpec(steps=12, lr=1e-4, seq_len=64, batch_size=4)
    art = qat.qat(model_dir=str(tiny_model_dir), model_fp="tiny", ptq=ptq, texts=texts, calib_digest="c1",
                      spec=spec)
    assert art.format == "int4_awq+qat" and art.cost_format == "int4_awq" and len(art.loss_curve) == 12
    assert art.loss_curve[-1] < 0.5 * art.loss_curve[0]  # distillation moves the student toward the teacher
    assert json.loads((Path(art.unified_dir) / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] \
        == ptq.quant_algo
    assert qat.qat(model_dir=str(tiny_model_dir), model_fp="tiny", ptq=ptq, texts=texts, calib_digest="c1",
                       spec=spec).cached


def test_qat_key_covers_every_hyper_parameter_and_the_data():
    parts = lambda **kw: recover.key_parts("qat", stage=qat, model_fp="m", device="cpu", **kw)  # noqa: E731
    base = dict(calibration="c", quantized="q", format="int4_awq", data="d", spec=QatSpec().model_dump())
    keys = {json.dumps(parts(**base), sort_keys=True)}
    for change in ({"data": "d2"}, {"quantized": "q2"}, {"spec": QatSpec(lr=2e-5).model_dump()},
                   {"spec": QatSpec(steps=51).model_dump()}, {"spec": QatSpec(seq_len=128).model_dump()},
                   {"spec": QatSpec(batch_size=8).model_dump()}):
        keys.add(json.dumps(parts(**base | change), sort_keys=True))
    assert len(keys) == 7


def test_training_texts_come_from_the_pool_never_the_held_out_split(tmp_path):
    from tasks.calibration import calibrate

    spec = CalibrationSpec(source="pydoc_topics", samples=8, holdout_fraction=0.3)
    texts = calibrate._pydoc_paragraphs()
    _, holdout, _ = calibrate.split_and_sample(texts, spec)
    hold = tmp_path / "holdout.parquet"
    pd.DataFrame({"text": holdout}).to_parquet(hold)
    train = qat.training_texts(spec, tmp_path, count=200, seed=0, calibration_file="", holdout_file=str(hold))
    assert len(train) == 200 and not set(train) & set(holdout)
    pd.DataFrame({"text": holdout + train[:1]}).to_parquet(hold)
    with pytest.raises(recover.RecoveryError, match="held-out"):
        qat.training_texts(spec, tmp_path, count=200, seed=0, calibration_file="", holdout_file=str(hold))


def test_memory_that_does_not_suffice_is_refused_before_starting():
    with pytest.raises(DoesNotFit, match=r"qat of int4_awq needs about .* GiB of cpu memory.*batch_size"):
        runtime.check_memory(1e15, "cpu", "qat of int4_awq", "lower recovery.qat.batch_size")


def test_non_finite_autoquantize_scores_are_a_named_error_not_a_solver_crash(tiny_model_dir, calib_file,
                                                                               monkeypatch):
    # what bf16 gradient scoring produced on a 0.74 B Llama on an H200: PuLP refused NaN scores deep in ModelOpt
    import modelopt.torch.quantization as mtq
    from pulp import PulpError

    def nan_scores(*args, **kwargs):
        raise PulpError("Cannot multiply variables with NaN/inf values")

    monkeypatch.setattr(mtq, "auto_quantize", nan_scores)
    spec = AutoQuantizeSpec(formats=["int4_awq", "fp8"], effective_bits=9.0, score_batches=1)
    with pytest.raises(recover.RecoveryError, match="NaN/inf.*method: kl_div"):
        auto_quantize.auto_quantize(model_dir=str(tiny_model_dir), model_fp="tiny", calibration_file=calib_file,
                              calib_digest="c-nan", spec=spec, recovered_from="int4_awq", max_tokens=32, batch_size=8)


def test_a_crashing_recovery_rung_is_reported_and_the_next_rung_still_runs(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from recipes.schema import Recipe

    recipe = Recipe.model_validate({
        "name": "r", "model": {"source": "hf_dir", "path": str(tmp_path), "name": "m"},
        "calibration": {"source": "pydoc_topics", "samples": 8}, "quantization": {"formats": ["int4_awq"]},
        "targets": [{"name": "local", "backend": "reference"}], "registry": {"name": "r"},
        "evaluation": {"tasks": ["holdout_perplexity"]},
        "recovery": {"auto_quantize": {"formats": ["int4_awq", "fp8"], "effective_bits": 9.0},
                     "qat": {"steps": 2}}})

    def crash(**kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(auto_quantize, "auto_quantize", crash)
    monkeypatch.setattr(qat, "training_texts", lambda *a, **k: ["text"])
    monkeypatch.setattr(qat, "qat", lambda **kw: "the qat artifact")
    from flows.stages import RunRecord
    from flows.target import recovery_rungs

    record = RunRecord()
    rungs = recovery_rungs(recipe, tmp_path, "int4_awq", SimpleNamespace(format="int4_awq"), recipe.targets[0],
                           "cpu-x86_64", SimpleNamespace(path="m", fingerprint="f"),
                           SimpleNamespace(calibration_file="c", holdout_file="h", digest="d"), record)
    results = {name: make() for name, make in rungs}
    assert results["auto_quantize"] == ("auto_quantize failed: RuntimeError: CUDA error: an illegal memory access "
                                        "was encountered")
    assert results["int4_awq+qat"] == "the qat artifact"
    assert [s["stage"] for s in record.stages] == ["recover"]  # the rung that ran is recorded as stage `recover`


def test_an_fp32_recovered_model_stored_for_bf16_loads_and_runs_in_bf16(tiny_model_dir, tmp_path):
    """On CUDA the rungs train/score in fp32 and the reference backend loads bf16: a stored fp32 AWQ
    pre_quant_scale met bf16 weights ("expected mat1 and mat2 to have the same dtype", seen on an H200)."""
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = runtime.load_model(str(tiny_model_dir), "cpu", dtype=torch.float32)
    calib = torch.randint(4, 512, (4, 48), generator=torch.Generator().manual_seed(1))
    cfg = quantize.build_quant_config("int4_awq", kv_cache="none", awq_block_size=64)
    mtq.quantize(model, cfg, lambda m: m(input_ids=calib, use_cache=False))
    recover.export_checkpoints(model, tokenizer, tmp_path, dtype=torch.bfloat16)

    mto.enable_huggingface_checkpointing()
    stored = AutoModelForCausalLM.from_pretrained(tmp_path / "fakequant", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = stored(input_ids=calib[:1]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
