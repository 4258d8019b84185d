import pytest

from recipes.schema import Recipe
from tasks.backends import target_runtime
from tasks.decisions.targets import arch_of, make_plan

CPU = {"arch": "cpu-x86_64", "device": "cpu"}
H100 = {"arch": "sm_90", "device": "cuda"}


def recipe(formats, targets):
    return Recipe.model_validate({
        "name": "t", "model": {"source": "hub", "id": "x/y"}, "calibration": {"source": "pydoc_topics"},
        "quantization": {"formats": formats}, "targets": targets, "evaluation": {"tasks": ["holdout_perplexity"]},
        "registry": {"name": "m"}})


def test_gpu_names_map_to_compute_capability():
    assert arch_of("H100") == "sm_90" and arch_of("a100") == "sm_80" and arch_of("B200") == "sm_100"
    assert arch_of("sm_89") == "sm_89"
    with pytest.raises(ValueError, match="unknown GPU 'H900'"):
        arch_of("H900")


def test_format_by_arch_validity_is_decided_before_any_work():
    r = recipe(["nvfp4", "fp8", "int4_awq"], [
        {"name": "h100", "gpu": "H100", "work_pool": "gpu-h100"},
        {"name": "a100", "gpu": "A100", "work_pool": "gpu-a100"},
        {"name": "b200", "gpu": "B200", "work_pool": "gpu-b200"}])
    plan = make_plan(r, H100, dispatch=True, runtime_of=target_runtime)
    runnable = {(p.format, p.target) for p in plan.runnable}
    assert runnable == {("fp8", "h100"), ("int4_awq", "h100"), ("int4_awq", "a100"),
                        ("nvfp4", "b200"), ("fp8", "b200"), ("int4_awq", "b200")}
    reasons = {(p.format, p.target): p.skip_reason for p in plan.pairs if p.skip_reason}
    assert "sm_100" in reasons[("nvfp4", "h100")] and "sm_89" in reasons[("fp8", "a100")]
    assert plan.formats_to_quantize == ["nvfp4", "fp8", "int4_awq"]


def test_nvfp4_is_skipped_when_quantizing_on_cpu():
    plan = make_plan(recipe(["nvfp4", "fp8"], [{"name": "local"}]), CPU, runtime_of=target_runtime)
    [nvfp4, fp8] = plan.pairs
    assert "CUDA" in nvfp4.skip_reason and fp8.skip_reason is None


def test_int8_sq_needs_the_legacy_engine_on_trtllm():
    plan = make_plan(recipe(["int8_sq"], [{"name": "h100", "gpu": "H100", "backend": "trtllm", "work_pool": "p"}]),
                     H100, runtime_of=target_runtime)
    assert "legacy" in plan.pairs[0].skip_reason


def test_target_for_another_gpu_without_a_pool_is_not_run_here():
    plan = make_plan(recipe(["fp8"], [{"name": "h100", "gpu": "H100"}]), CPU, runtime_of=target_runtime)
    assert "work_pool" in plan.pairs[0].skip_reason and plan.unplaced["h100"]


def test_pooled_target_for_another_arch_is_unplaced_without_a_server():
    r = recipe(["fp8", "nvfp4"], [{"name": "b200", "gpu": "B200", "work_pool": "gpu-b200"}])
    plan = make_plan(r, H100, runtime_of=target_runtime)
    assert "gpu-b200" in plan.unplaced["b200"] and not plan.runnable
    assert plan.formats_to_quantize == ["fp8", "nvfp4"]  # still quantized here, for the pool's workers


def test_int8_sq_on_trtllm_is_valid_with_the_legacy_engine():
    plan = make_plan(recipe(["int8_sq", "fp8"], [
        {"name": "h100", "gpu": "H100", "backend": "trtllm", "engine": "legacy", "work_pool": "p",
         "trtllm_version": "1.2.1"}]), H100, runtime_of=target_runtime)
    assert [p.skip_reason for p in plan.pairs] == [None, None]


def test_the_legacy_engine_refuses_smoothquant_and_int4_weight_only_on_sm100_to_119():
    formats = ["int8_sq", "int4_awq", "fp8", "nvfp4"]
    legacy = {"backend": "trtllm", "engine": "legacy", "trtllm_version": "1.2.1"}
    pools = [{"name": "b200", "gpu": "B200", "work_pool": "gpu-b200", **legacy},
             {"name": "b300", "gpu": "B300", "work_pool": "gpu-b300", **legacy},
             {"name": "rtx", "gpu": "RTX-PRO-6000", "work_pool": "gpu-rtx", **legacy},
             {"name": "b200-profile", "gpu": "B200", "backend": "trtllm", "work_pool": "gpu-b200"}]
    plan = make_plan(recipe(formats, pools), {"arch": "sm_100", "device": "cuda"}, dispatch=True,
                     runtime_of=target_runtime)
    reasons = {(p.format, p.target): p.skip_reason for p in plan.pairs}
    for t in ("b200", "b300"):
        assert "legacy TensorRT engine" in reasons[("int8_sq", t)] and "builder.py" in reasons[("int8_sq", t)]
        assert "allowed: sm_80-sm_99, sm_120+" in reasons[("int4_awq", t)]
        assert reasons[("fp8", t)] is None and reasons[("nvfp4", t)] is None
    # TensorRT-LLM's builder check is 100 <= sm < 120: sm_120 is not refused by it
    assert reasons[("int8_sq", "rtx")] is None and reasons[("int4_awq", "rtx")] is None
    assert "engine: legacy" in reasons[("int8_sq", "b200-profile")] and reasons[("int4_awq", "b200-profile")] is None


def test_trtllm_targets_need_a_gpu():
    plan = make_plan(recipe(["int4_awq"], [{"name": "local", "backend": "trtllm"}]), CPU, runtime_of=target_runtime)
    assert "NVIDIA GPUs" in plan.pairs[0].skip_reason


def test_the_legacy_engine_is_a_trtllm_setting():
    with pytest.raises(ValueError, match=r"targets\.0\.reference\.engine\n  Extra inputs are not permitted"):
        recipe(["fp8"], [{"name": "h100", "gpu": "H100", "engine": "legacy"}])
    assert recipe(["fp8"], [{"name": "h100", "backend": "trtllm"}]).targets[0].engine == "profile"


FLEET = [{"name": "rtx5090", "gpu": "RTX-5090", "backend": "trtllm", "work_pool": "gpu-rtx5090"},
         {"name": "b200", "gpu": "B200", "backend": "trtllm", "work_pool": "gpu-b200"},
         {"name": "h100", "gpu": "H100", "backend": "trtllm", "work_pool": "gpu-h100"}]
FORMATS = ["int4_awq", "w4a8_awq", "fp8", "nvfp4", "int8_sq"]


def test_plan_on_rtx5090_b200_h100_allows_exactly_the_pairs_the_sources_allow():
    """TensorRT-LLM's hardware table (quantization.md): sm120 serves NVFP4 and FP8 only; sm100/103 NVFP4 and FP8,
    and W4A8/W4A16 AWQ from the sm100 weight-only kernels (PR #10190, 1.3 line); Hopper FP8 and both AWQ formats;
    INT8-SmoothQuant has no PyTorch-runtime kernels anywhere."""
    plan = make_plan(recipe(FORMATS, FLEET), H100, dispatch=True, runtime_of=target_runtime)
    assert {(p.target, p.format) for p in plan.runnable} == {
        ("rtx5090", "fp8"), ("rtx5090", "nvfp4"),
        ("b200", "int4_awq"), ("b200", "w4a8_awq"), ("b200", "fp8"), ("b200", "nvfp4"),
        ("h100", "int4_awq"), ("h100", "w4a8_awq"), ("h100", "fp8")}
    reasons = {(p.target, p.format): p.skip_reason for p in plan.pairs if p.skip_reason}
    assert set(reasons) == {("rtx5090", "int4_awq"), ("rtx5090", "w4a8_awq"), ("rtx5090", "int8_sq"),
                            ("b200", "int8_sq"), ("h100", "nvfp4"), ("h100", "int8_sq")}
    assert "not served by TensorRT-LLM's PyTorch runtime on sm_120" in reasons[("rtx5090", "int4_awq")]
    assert "quantization.md" in reasons[("rtx5090", "w4a8_awq")]  # every skip names its source
    assert "allowed: sm_100, sm_103, sm_120" in reasons[("h100", "nvfp4")]
    assert all("engine: legacy" in reasons[(t, "int8_sq")] for t in ("rtx5090", "b200", "h100"))


def test_awq_on_blackwell_depends_on_the_release():
    fleet = [dict(FLEET[1], trtllm_version="1.2.1")]
    plan = make_plan(recipe(["int4_awq", "w4a8_awq", "fp8"], fleet), H100, dispatch=True, runtime_of=target_runtime)
    reasons = {p.format: p.skip_reason for p in plan.pairs}
    assert reasons["fp8"] is None
    assert "TensorRT-LLM 1.2.1" in reasons["int4_awq"] and "#10190" in reasons["int4_awq"]
    assert ">=1.3.0rc0" in reasons["w4a8_awq"]


def test_legacy_engine_on_an_image_that_cannot_build_it_is_refused_at_plan_time():
    legacy = {"name": "h100-sq", "gpu": "H100", "backend": "trtllm", "engine": "legacy", "work_pool": "gpu-h100"}
    plan = make_plan(recipe(["int8_sq", "fp8"], [legacy]), H100, runtime_of=target_runtime)  # default image: 1.3.0rc21
    assert not plan.runnable
    assert all("needs TensorRT-LLM <=1.3.0rc20; this target's image is 1.3.0rc21" in p.skip_reason
               for p in plan.pairs)
    ok = make_plan(recipe(["int8_sq", "fp8"], [dict(legacy, trtllm_version="1.3.0rc20")]), H100,
                   runtime_of=target_runtime)
    assert [p.skip_reason for p in ok.pairs] == [None, None]


def test_kv_cache_rules_follow_the_hardware_table():
    r = recipe(["fp8"], FLEET)
    nvfp4_kv = r.model_copy(update={"quantization": r.quantization.model_copy(update={"kv_cache": "nvfp4_cast"})})
    plan = make_plan(nvfp4_kv, H100, dispatch=True, runtime_of=target_runtime)
    reasons = {p.target: p.skip_reason for p in plan.pairs}
    assert reasons["b200"] is None and "KV cache nvfp4_cast" in reasons["h100"] and "sm_120" in reasons["rtx5090"]
    assert "needs CUDA" in make_plan(nvfp4_kv.model_copy(update={"targets": nvfp4_kv.targets[1:2]}), CPU,
                                     dispatch=True, runtime_of=target_runtime).pairs[0].skip_reason
    runtime_nvfp4 = recipe(["fp8"], [dict(t, kv_cache_dtype="nvfp4") for t in FLEET])
    reasons = {p.target: p.skip_reason
               for p in make_plan(runtime_nvfp4, H100, dispatch=True, runtime_of=target_runtime).pairs}
    assert reasons["b200"] is None and "kv_cache_dtype nvfp4" in reasons["h100"]


def test_the_dockerfile_pin_is_the_default_release():
    from pathlib import Path

    from tasks.decisions.targets import DEFAULT_TRTLLM_VERSION

    root = Path(__file__).parents[3]
    image = f"nvcr.io/nvidia/tensorrt-llm/release:{DEFAULT_TRTLLM_VERSION}"
    assert f"ARG TRTLLM_IMAGE={image}\n" in (root / "docker" / "trtllm.Dockerfile").read_text()
    for pinned in ("docker-compose.yml", "docker/gpu-host.compose.yml", ".env.example"):
        assert image in (root / pinned).read_text(), pinned


def test_gpu_names_match_whole_words():
    from tasks.decisions.targets import gpu_matches

    assert gpu_matches("H20", "NVIDIA H20") and not gpu_matches("H20", "NVIDIA H200")
    assert gpu_matches("H100", "NVIDIA H100 80GB HBM3") and gpu_matches("RTX-5090", "NVIDIA GeForce RTX 5090")
