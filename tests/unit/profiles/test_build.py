"""Real ModelOpt quantization, export and reference builds on a tiny Llama made in the test."""

import json
from pathlib import Path

import pytest

from recipes.schema import ReferenceTarget
from tasks import store
from tasks.host import machine
from tasks.profiles import build, profile
from tasks.quantization import quantize


def test_awq_group_size_is_chosen_to_divide_every_layer():
    sizes = {"q_proj": 576, "down_proj": 1536}  # SmolLM2-135M's hidden and intermediate sizes
    assert quantize.choose_awq_block_size(sizes, None) == 64
    with pytest.raises(quantize.QuantizationError) as err:
        quantize.choose_awq_block_size(sizes, 128)
    assert "q_proj (576)" in str(err.value) and "down_proj" not in str(err.value)


def test_awq_config_carries_the_group_size():
    cfg = quantize.build_quant_config("int4_awq", kv_cache="none", awq_block_size=64)
    blocks = [e["cfg"]["block_sizes"] for e in cfg["quant_cfg"]
              if isinstance(e.get("cfg"), dict) and "block_sizes" in e["cfg"]]
    assert blocks and all(b[-1] == 64 for b in blocks)
    import modelopt.torch.quantization as mtq
    assert mtq.INT4_AWQ_CFG["quant_cfg"][1]["cfg"]["block_sizes"][-1] == 128  # the shared preset is untouched


def test_fp8_kv_cache_adds_kv_quantizers():
    cfg = quantize.build_quant_config("fp8", kv_cache="fp8", awq_block_size=None)
    assert any("bmm_quantizer" in e["quantizer_name"] for e in cfg["quant_cfg"])


def test_nvfp4_on_cpu_is_refused_with_a_reason(tiny_model_dir, calib_file):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(quantize.QuantizationError, match="NVFP4"):
        quantize.quantize(model_dir=str(tiny_model_dir), model_fp="m", calibration_file=calib_file,
                          calib_digest="c", fmt="nvfp4")


def _quantize(model_dir, calib_file, fmt="fp8", **kw):
    return quantize.quantize(model_dir=str(model_dir), model_fp="fp-" + fmt, calibration_file=calib_file,
                             calib_digest="digest", fmt=fmt, max_tokens=64, batch_size=4, **kw)


def test_fp8_quantize_exports_unified_checkpoint_and_is_cached(tiny_model_dir, calib_file):
    q = _quantize(tiny_model_dir, calib_file)
    assert not q.cached and q.quant_algo == "FP8"
    unified = Path(q.unified_dir)
    quant_cfg = json.loads((unified / "hf_quant_config.json").read_text())
    assert quant_cfg["quantization"]["quant_algo"] == "FP8"
    assert (unified / "tokenizer.json").is_file()  # the exporter does not write it; we do
    assert (Path(q.fakequant_dir) / "quant_state.json").is_file()  # quantizer state, base weights linked
    again = _quantize(tiny_model_dir, calib_file)
    assert again.cached and again.fingerprint == q.fingerprint
    other = quantize.quantize(model_dir=str(tiny_model_dir), model_fp="fp-fp8", calibration_file=calib_file,
                              calib_digest="another-calibration-set", fmt="fp8", max_tokens=64, batch_size=4)
    assert not other.cached  # the calibration set is part of the key


def test_reference_profile_build_manifest_and_verify_on_load(tiny_model_dir, calib_file):
    q = _quantize(tiny_model_dir, calib_file)
    device = machine.local_device()
    target = ReferenceTarget(name="local")
    art = build.build(model_slug="tiny", checkpoint_dir=q.fakequant_dir, checkpoint_fp=q.fingerprint, fmt="fp8",
                      quant_algo=q.quant_algo, target=target, device=device)
    manifest = store.read_manifest(Path(art.path))
    assert manifest["target"]["arch"] == device["arch"] and manifest["format"] == "fp8"
    assert set(manifest["toolchain"]) == {"torch", "transformers", "modelopt"}
    assert store.verify(Path(art.path), full=True) == []
    assert {"checkpoint/model.safetensors", "runtime.yaml"} <= set(manifest["files"])
    assert Path(art.path).match(f"profiles/tiny/fp8/{device['arch']}-tp1/*")
    assert profile.verify_artifact(art.path)["format"] == "fp8"
    assert build.build(model_slug="tiny", checkpoint_dir=q.fakequant_dir, checkpoint_fp=q.fingerprint, fmt="fp8",
                       quant_algo=q.quant_algo, target=target, device=device).cached

    with pytest.raises(profile.ArtifactMismatch) as err:
        profile.verify_artifact(art.path, device={"arch": "sm_90"})
    assert f"built for {device['arch']}, this machine is sm_90" in str(err.value)
    toolchain = dict(manifest["toolchain"], modelopt="0.46.0")
    with pytest.raises(profile.ArtifactMismatch, match=r"modelopt: built with .*, installed here 0.46.0"):
        profile.verify_artifact(art.path, toolchain=toolchain)


def test_reference_model_restores_fake_quant(tiny_model_dir, calib_file):
    from tasks.backends import reference

    q = _quantize(tiny_model_dir, calib_file)
    art = build.build(model_slug="tiny", checkpoint_dir=q.fakequant_dir, checkpoint_fp=q.fingerprint, fmt="fp8",
                      quant_algo=q.quant_algo, target=ReferenceTarget(name="local"), device=machine.local_device())
    model, _ = reference.load_model(Path(art.path))
    quantizers = [n for n, _ in model.named_modules() if n.endswith("weight_quantizer")]
    assert quantizers, "the reference backend must compute with the quantizers, not plain weights"


def test_plan_explains_why_a_stage_would_rerun(tiny_model_dir, calib_file, monkeypatch):
    from flows import cache_status

    q = _quantize(tiny_model_dir, calib_file)
    parts = store.read_manifest(Path(q.path))["inputs"]
    assert cache_status.explain(Path(q.path), [], parts) == (True, "cache hit")
    real = machine.version_of
    monkeypatch.setattr(machine, "version_of", lambda d: "0.99.0" if d == "nvidia-modelopt" else real(d))
    new_parts = quantize.key_parts(model_fp="fp-fp8", calib_digest="digest", fmt="fp8", kv_cache="none",
                                   awq_block_size=None, max_tokens=64, batch_size=4, device=parts["device"])
    out = store.stage_dir("quantized/fp8", store.key_of("quantize", new_parts))
    cached, reason = cache_status.explain(out, [Path(q.path)], new_parts)
    assert not cached and reason == f"toolchain.modelopt: {real('nvidia-modelopt')} → 0.99.0"


def test_int4_awq_exports_a_unified_checkpoint_on_cpu(tiny_model_dir, calib_file):
    q = _quantize(tiny_model_dir, calib_file, fmt="int4_awq")
    config = json.loads((Path(q.unified_dir) / "hf_quant_config.json").read_text())["quantization"]
    assert config["quant_algo"] == "W4A16_AWQ" == q.quant_algo
    assert q.awq_block_size == 64 and config["group_size"] == 64  # 64 divides the tiny model's 64/128 inputs
