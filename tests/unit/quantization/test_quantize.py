"""Quantization against ModelOpt's own example (examples/hf_ptq/hf_ptq.py) and TensorRT-LLM's kernel limits:
AWQ group sizes, GPT-2's Conv1D layers, the calibration loop, the KV-cache presets. Real ModelOpt on tiny models."""

import json
from pathlib import Path

import pandas as pd
import pytest

from recipes.schema import QuantizationSpec, ReferenceTarget
from tasks import backends
from tasks.host import machine
from tasks.profiles import build
from tasks.quantization import quantize


@pytest.fixture()
def calib_file(tmp_path):
    from pydoc_data.topics import topics

    path = tmp_path / "calibration.parquet"
    pd.DataFrame({"text": [t[:400] for t in list(topics.values())[:8]]}).to_parquet(path)
    return str(path)


def _quantize(model_dir, calib_file, fmt, max_tokens=64, **kw):
    return quantize.quantize(model_dir=str(model_dir), model_fp=f"fp-{Path(model_dir).name}-{fmt}",
                             calibration_file=calib_file, calib_digest="digest", fmt=fmt, max_tokens=max_tokens,
                             batch_size=4, **kw)


def test_awq_group_size_is_128_or_64_and_fits_every_rank():
    assert quantize.choose_awq_block_size({"a": 256, "b": 1024}, None) == 128
    assert quantize.choose_awq_block_size({"a": 320, "b": 1280}, None) == 64  # GPT-2-shaped, hidden 320
    assert quantize.choose_awq_block_size({"a": 256}, None, tp_sizes=(1, 2)) == 128
    assert quantize.choose_awq_block_size({"a": 384}, None, tp_sizes=(1, 2)) == 64  # 384/2 = 192: 64 only
    with pytest.raises(quantize.QuantizationError, match="a \\(96\\)"):  # 32 or 16 are never chosen
        quantize.choose_awq_block_size({"a": 96}, None)
    with pytest.raises(quantize.QuantizationError) as err:
        quantize.choose_awq_block_size({"attn.c_proj": 320}, None, tp_sizes=(2,))
    assert "attn.c_proj (320 / tp 2 = 160)" in str(err.value) and "64 or 128" in str(err.value)
    with pytest.raises(quantize.QuantizationError, match="awq_block_size=128"):
        quantize.choose_awq_block_size({"a": 320}, 128)
    with pytest.raises(ValueError, match="awq_block_size"):
        QuantizationSpec(formats=["int4_awq"], awq_block_size=48)


def test_gpt2_conv1d_layers_are_counted(tiny_gpt2):
    sizes = quantize._linear_sizes_from_config(str(tiny_gpt2(320)))
    assert sizes["transformer.h.0.attn.c_attn"] == 320 and sizes["transformer.h.0.mlp.c_proj"] == 1280
    assert not any("lm_head" in n for n in sizes)


@pytest.mark.parametrize("hidden", [320, 448])
def test_int4_awq_end_to_end_on_gpt2(tiny_gpt2, calib_file, hidden):
    """quantize -> unified export -> reference build -> load and run, on GPT-2 shapes whose hidden size 128 does
    not divide (the group size that failed at export before: 'Cannot pack weight with input dimension 320')."""
    import torch
    from transformers import AutoTokenizer

    from tasks.backends import reference

    model_dir = tiny_gpt2(hidden)
    q = _quantize(model_dir, calib_file, "int4_awq", max_tokens=32)
    config = json.loads((Path(q.unified_dir) / "hf_quant_config.json").read_text())["quantization"]
    assert q.awq_block_size == 64 and config["group_size"] == 64 and config["quant_algo"] == "W4A16_AWQ"
    # the saved tokenizer is the model's own: calibration padded with EOS on a copy
    assert AutoTokenizer.from_pretrained(q.unified_dir).pad_token is None
    assert AutoTokenizer.from_pretrained(q.fakequant_dir).pad_token is None
    art = build.build(model_slug=f"gpt2-{hidden}", checkpoint_dir=backends.checkpoint_for(q, ReferenceTarget(name="l")),
                      checkpoint_fp=q.fingerprint, fmt="int4_awq", quant_algo=q.quant_algo,
                      target=ReferenceTarget(name="local"), device=machine.local_device())
    model, tokenizer = reference.load_model(Path(art.path))
    assert any(n.endswith("c_attn.weight_quantizer") for n, _ in model.named_modules())
    ids = tokenizer("Quantization reduces the memory of large models.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss
    assert torch.isfinite(loss)


def test_awq_that_cannot_fit_the_tp_is_refused_before_calibration(tiny_gpt2, calib_file, monkeypatch):
    def no_calibration(*a, **k):
        raise AssertionError("calibration must not start")

    monkeypatch.setattr(quantize, "calibration_forward", no_calibration)
    with pytest.raises(quantize.QuantizationError, match=r"320 / tp 2 = 160"):
        _quantize(tiny_gpt2(320), calib_file, "int4_awq", tp_sizes=(1, 2))


def test_calibration_loop_disables_the_kv_cache_and_halves_a_batch_on_cuda_oom():
    import torch

    seen = []

    class Model:
        def __call__(self, input_ids, attention_mask, use_cache):
            seen.append((input_ids.shape[0], use_cache, torch.is_grad_enabled()))
            if input_ids.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    batch = {"input_ids": torch.ones(8, 4, dtype=torch.long), "attention_mask": torch.ones(8, 4)}
    assert quantize.calibration_forward(Model(), [batch, dict(batch)]) == 2
    sizes = [n for n, _, _ in seen]
    assert sizes == [8, 4, 2, 2, 2, 2] + [2, 2, 2, 2]  # halves, then later batches go at the size that worked
    assert all(use_cache is False and not grad for _, use_cache, grad in seen)

    class Hopeless:
        def __call__(self, **_):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(quantize.QuantizationError, match="single sample"):
        quantize.calibration_forward(Hopeless(), [{"input_ids": torch.ones(2, 4, dtype=torch.long)}])


def test_kv_cache_presets_are_modelopts():
    cfg = quantize.build_quant_config("fp8", kv_cache="fp8_cast", awq_block_size=None)
    [kv] = [e for e in cfg["quant_cfg"] if e["quantizer_name"] == "*[kv]_bmm_quantizer"]
    assert kv["cfg"]["use_constant_amax"] is True and kv["cfg"]["num_bits"] == (4, 3)
    calibrated = quantize.build_quant_config("fp8", kv_cache="fp8", awq_block_size=None)
    [kv] = [e for e in calibrated["quant_cfg"] if e["quantizer_name"] == "*[kv]_bmm_quantizer"]
    assert not kv["cfg"].get("use_constant_amax")
    nvfp4 = quantize.build_quant_config("fp8", kv_cache="nvfp4", awq_block_size=None)
    assert any(e["quantizer_name"] == "*[kv]_bmm_quantizer" and e["cfg"]["num_bits"] == (2, 1)
               for e in nvfp4["quant_cfg"])


def test_fp8_cast_kv_cache_on_cpu_against_none(tiny_model_dir, calib_file):
    """fp8_cast quantizes K and V with a constant scale (amax 448) and no KV calibration; the export says FP8 KV;
    accuracy is measured against the same format without KV quantization on held-out text."""
    import torch

    from tasks.backends import reference

    def nll(q) -> float:
        art = build.build(model_slug="tiny", checkpoint_dir=q.fakequant_dir, checkpoint_fp=q.fingerprint,
                          fmt="fp8", quant_algo=q.quant_algo, target=ReferenceTarget(name="local"),
                          device=machine.local_device())
        model, tokenizer = reference.load_model(Path(art.path))
        from pydoc_data.topics import topics

        texts = [t[:300] for t in list(topics.values())[-8:]]  # not in the calibration set
        losses = []
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt")
                losses.append(model(**ids, labels=ids["input_ids"]).loss.item())
        kv = [m for n, m in model.named_modules() if n.endswith(("k_bmm_quantizer", "v_bmm_quantizer"))]
        return sum(losses) / len(losses), kv

    base = _quantize(tiny_model_dir, calib_file, "fp8")
    cast = _quantize(tiny_model_dir, calib_file, "fp8", kv_cache="fp8_cast")
    assert cast.fingerprint != base.fingerprint
    kv_algo = json.loads((Path(cast.unified_dir) / "hf_quant_config.json").read_text())["quantization"]
    assert kv_algo["kv_cache_quant_algo"] == "FP8"
    (base_nll, base_kv), (cast_nll, cast_kv) = nll(base), nll(cast)
    assert not any(q.is_enabled for q in base_kv)
    assert cast_kv and all(q.is_enabled for q in cast_kv)
    assert abs(cast_nll - base_nll) < 0.05 * base_nll, (base_nll, cast_nll)


def test_nvfp4_kv_cache_needs_cuda_and_is_refused_on_cpu(tiny_model_dir, calib_file):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(quantize.QuantizationError, match="NVFP4 KV-cache"):
        _quantize(tiny_model_dir, calib_file, "fp8", kv_cache="nvfp4_cast")
