"""The CUDA path on a real GPU: NVFP4/FP8 calibration on CUDA, a profile built for this GPU's sm arch."""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "int4_awq"])
def test_cuda_quantization_and_sm_arch_profile(tiny_model_dir, calib_file, fmt):
    from recipes.schema import ReferenceTarget
    from tasks.host import machine
    from tasks.profiles import build, profile
    from tasks.quantization import quantize

    q = quantize.quantize(model_dir=str(tiny_model_dir), model_fp="tiny", calibration_file=calib_file,
                          calib_digest="c", fmt=fmt, max_tokens=64, batch_size=4)
    assert Path(q.unified_dir, "hf_quant_config.json").is_file()
    device = machine.local_device()
    major, minor = torch.cuda.get_device_capability(0)
    assert device["arch"] == f"sm_{major}{minor}" and device["gpu_name"]
    art = build.build(model_slug="tiny", checkpoint_dir=q.fakequant_dir, checkpoint_fp=q.fingerprint, fmt=fmt,
                      quant_algo=q.quant_algo, target=ReferenceTarget(name="gpu"), device=device)
    assert art.manifest["target"]["arch"] == device["arch"]
    assert art.manifest["build_options"]["device"] == "cuda"
    with pytest.raises(profile.ArtifactMismatch, match="architecture"):
        profile.verify_artifact(art.path, device=dict(device, arch="sm_80"))


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq"])
def test_quantizer_state_restores_bit_exactly_on_cuda(tiny_model_dir, tmp_path, fmt):
    """The CPU test's claim (tests/unit/test_quant_state.py) on the GPU, in bf16 as the quantize stage runs there."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from tasks.models import quant_state
    from tasks.quantization import quantize

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, device_map="cuda:0").eval()

    model = load()
    cfg = quantize.build_quant_config(fmt, kv_cache="none", awq_block_size=64 if fmt == "int4_awq" else None)
    calib = torch.randint(4, 512, (4, 48), generator=torch.Generator().manual_seed(1)).cuda()
    with quant_state.recording_folds() as folds, torch.no_grad():
        mtq.quantize(model, cfg, lambda m: m(input_ids=calib, use_cache=False))
    ids = torch.randint(4, 512, (2, 40), generator=torch.Generator().manual_seed(7)).cuda()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    quant_state.save(model, tmp_path, base_fingerprint="b", folds=folds)
    restored = quant_state.restore(load(), tmp_path)
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids).logits, expected)


def test_recovery_rungs_train_score_and_build_on_cuda(tiny_model_dir, calib_file):
    """AutoQuantize scores in fp32 and QAT trains fp32 master weights on CUDA (AdamW steps of ~lr vanish in bf16
    weights); both store bf16 checkpoints the reference backend builds and runs (on an H200 an fp32-stored AWQ
    scale met bf16 weights and broke the build check)."""
    from pydoc_data.topics import topics

    from recipes.schema import AutoQuantizeSpec, QatSpec, ReferenceTarget
    from tasks.profiles import build
    from tasks.quantization import auto_quantize, qat, quantize

    ptq = quantize.quantize(model_dir=str(tiny_model_dir), model_fp="tiny", calibration_file=calib_file,
                            calib_digest="c", fmt="int4_awq", max_tokens=64, batch_size=4)
    aq = auto_quantize.auto_quantize(model_dir=str(tiny_model_dir), model_fp="tiny", calibration_file=calib_file,
                                     calib_digest="c", spec=AutoQuantizeSpec(formats=["int4_awq", "fp8"],
                                                                             effective_bits=9.0, score_batches=2),
                                     recovered_from="int4_awq", max_tokens=64, batch_size=8)
    assert aq.weight_bits is not None and aq.weight_bits <= 9.0
    trained = qat.qat(model_dir=str(tiny_model_dir), model_fp="tiny", ptq=ptq, texts=[list(topics.values())[30][:400]],
                      calib_digest="c", spec=QatSpec(steps=12, lr=1e-4, seq_len=64, batch_size=4))
    assert trained.loss_curve[-1] < 0.5 * trained.loss_curve[0]  # the student moved: its fp32 weights took the steps
    from tasks.host import machine

    device = machine.local_device()
    for art in (aq, trained):
        profile = build.build(model_slug="tiny", checkpoint_dir=art.fakequant_dir, checkpoint_fp=art.fingerprint,
                              fmt=art.format, quant_algo=art.quant_algo, target=ReferenceTarget(name="gpu"),
                              device=device)
        assert profile.manifest["build_options"]["dtype"] == "bfloat16"
