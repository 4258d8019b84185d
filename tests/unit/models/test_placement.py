"""GPU-path decisions that need no GPU: where a model goes (one GPU, sharded, refused) and the extension warm-up."""

import logging

import pytest

from tasks.models import placement, warmup

GIB = 2**30
H200 = ("NVIDIA H200", 139 * GIB, 141 * GIB)


def test_a_model_that_fits_one_gpu_stays_on_it():
    p = placement.decide(15 * GIB, [H200, H200])
    assert not p.sharded and p.device == "cuda" and p.load_kwargs() == {"device_map": "cuda:0"}


def test_a_model_larger_than_one_gpu_is_sharded_over_all_visible_gpus():
    p = placement.decide(140 * GIB, [H200, H200], params=70_000_000_000)
    assert p.sharded and p.gpus == 2
    kwargs = p.load_kwargs()
    assert kwargs["device_map"] == "auto" and set(kwargs["max_memory"]) == {0, 1}
    assert all(b < 139 * GIB for b in kwargs["max_memory"].values())  # room left for activations on each GPU
    assert sum(kwargs["max_memory"].values()) >= 140 * GIB


def test_a_model_too_large_for_every_gpu_is_refused_with_sizes_and_what_to_change():
    busy = ("NVIDIA H200", 20 * GIB, 141 * GIB)  # another process holds most of GPU 1
    with pytest.raises(placement.DoesNotFit) as err:
        placement.decide(140 * GIB, [H200, busy], params=70_000_000_000, what="model big (fp8)")
    msg = str(err.value)
    assert "model big (fp8) needs 140.0 GiB" in msg and "70.00B parameters in bfloat16" in msg
    assert "GPU 1 NVIDIA H200: 20.0 of 141.0 GiB free" in msg
    assert "more or larger GPUs" in msg and "CUDA_VISIBLE_DEVICES" in msg


def test_no_gpu_means_cpu():
    assert placement.decide(GIB, []).device == "cpu"


def test_weight_bytes_come_from_the_config_alone(tiny_model_dir):
    import torch

    params, nbytes = placement.weight_bytes(tiny_model_dir, torch.bfloat16)
    assert nbytes == 2 * params and params > 100_000


def test_the_stage_says_when_it_would_compile_modelopt_extensions(monkeypatch, tmp_path, caplog):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(warmup, "_build_dir", lambda name: tmp_path / name)
    (tmp_path / "modelopt_cuda_ext").mkdir()
    (tmp_path / "modelopt_cuda_ext" / "modelopt_cuda_ext.so").write_bytes(b"")  # this one was compiled before
    with caplog.at_level(logging.WARNING):
        missing = warmup.announce("quantize fp8")
    assert missing == ["modelopt_cuda_ext_fp8", "modelopt_cuda_ext_mx"]
    assert "quantize fp8: ModelOpt's CUDA extensions modelopt_cuda_ext_fp8, modelopt_cuda_ext_mx" in caplog.text
    assert "enginewright warmup" in caplog.text


def test_warmup_without_a_gpu_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        warmup.warmup()
