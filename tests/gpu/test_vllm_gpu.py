"""The vllm backend's quantized path on a real GPU: an FP8 (and NVFP4) ModelOpt export built into a vllm profile,
served by vLLM with ModelOpt's method detected, scored by lm-eval through the engine and timed, one engine per
profile. Needs ENGINEWRIGHT_VLLM_PYTHON (vLLM's own environment) and a GPU of sm_89 or later."""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A Llama vLLM's kernels take (head_dim 64), with the tests' BPE tokenizer."""
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import _tiny_tokenizer

    out = tmp_path_factory.mktemp("vllm-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out)
    _tiny_tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("fmt, method", [("fp8", "modelopt"), ("nvfp4", "modelopt_fp4")])
def test_a_quantized_export_is_served_scored_and_timed_by_vllm(llama_dir, calib_file, tmp_path, monkeypatch, fmt,
                                                               method):
    import os

    import pandas as pd

    from recipes.schema import EvaluationSpec, LatencySpec, VllmTarget
    from tasks import backends
    from tasks.host import machine
    from tasks.profiles import build
    from tasks.quantization import quantize
    from tasks.validation import accuracy, latency

    if not os.environ.get("ENGINEWRIGHT_VLLM_PYTHON"):
        pytest.skip("ENGINEWRIGHT_VLLM_PYTHON is not set")
    q = quantize.quantize(model_dir=str(llama_dir), model_fp="vllm-llama", calibration_file=calib_file,
                          calib_digest="c", fmt=fmt, max_tokens=64, batch_size=4)
    target = VllmTarget(name="gpu", backend="vllm", max_seq_len=512, max_batch_size=8, gpu_memory_utilization=0.3)
    device = machine.local_device()
    profile = build.build(model_slug="vllm-llama", checkpoint_dir=backends.checkpoint_for(q, target),
                          checkpoint_fp=q.fingerprint, fmt=fmt, quant_algo=q.quant_algo, target=target,
                          device=device)
    engine = json.loads((Path(profile.path) / "engine.json").read_text())
    assert engine["quantization"] == method and engine["kv_cache_tokens"] > 0
    holdout = tmp_path / "holdout.parquet"
    from pydoc_data.topics import topics

    pd.DataFrame({"text": list(topics.values())[:40]}).to_parquet(holdout)
    with backends.get("vllm").session(profile.path):
        acc = accuracy.measure_accuracy(profile_dir=profile.path, profile_fp=profile.fingerprint, backend_name="vllm",
                                        spec=EvaluationSpec(tasks=["holdout_perplexity"], limit=8, batch_size=4),
                                        holdout_file=str(holdout))
        lat = latency.measure_latency(profile_dir=profile.path, profile_fp=profile.fingerprint, backend_name="vllm",
                                      spec=LatencySpec(concurrency=[1], requests=3, warmup=1, input_tokens=32,
                                                       output_tokens=8),
                                      holdout_file=str(holdout), holdout_digest="h", device=device)
    assert acc.metrics["holdout_perplexity"]["word_perplexity"] > 1
    assert lat.summary["concurrency=1"]["output_tokens_per_s"] > 0 and lat.summary["deployment_speed"] is True
    assert Path(profile.path, "build.log").read_text().count("Initializing a V1 LLM engine") == 1
