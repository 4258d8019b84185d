import pytest

from recipes.schema import Recipe
from tasks.targets import arch_of, make_plan

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
    plan = make_plan(r, H100, dispatch=True)
    runnable = {(p.format, p.target) for p in plan.runnable}
    assert runnable == {("fp8", "h100"), ("int4_awq", "h100"), ("int4_awq", "a100"),
                        ("nvfp4", "b200"), ("fp8", "b200"), ("int4_awq", "b200")}
    reasons = {(p.format, p.target): p.skip_reason for p in plan.pairs if p.skip_reason}
    assert "sm_100" in reasons[("nvfp4", "h100")] and "sm_89" in reasons[("fp8", "a100")]
    assert plan.formats_to_quantize == ["nvfp4", "fp8", "int4_awq"]


def test_nvfp4_is_skipped_when_quantizing_on_cpu():
    plan = make_plan(recipe(["nvfp4", "fp8"], [{"name": "local"}]), CPU)
    [nvfp4, fp8] = plan.pairs
    assert "CUDA" in nvfp4.skip_reason and fp8.skip_reason is None


def test_int8_sq_needs_the_legacy_engine_on_trtllm():
    plan = make_plan(recipe(["int8_sq"], [{"name": "h100", "gpu": "H100", "backend": "trtllm", "work_pool": "p"}]), H100)
    assert "legacy" in plan.pairs[0].skip_reason


def test_target_for_another_gpu_without_a_pool_is_not_run_here():
    plan = make_plan(recipe(["fp8"], [{"name": "h100", "gpu": "H100"}]), CPU)
    assert "work_pool" in plan.pairs[0].skip_reason and plan.unplaced["h100"]


def test_pooled_target_for_another_arch_is_unplaced_without_a_server():
    r = recipe(["fp8", "nvfp4"], [{"name": "b200", "gpu": "B200", "work_pool": "gpu-b200"}])
    plan = make_plan(r, H100)
    assert "gpu-b200" in plan.unplaced["b200"] and not plan.runnable
    assert plan.formats_to_quantize == ["fp8", "nvfp4"]  # still quantized here, for the pool's workers


def test_int8_sq_on_trtllm_is_valid_with_the_legacy_engine():
    plan = make_plan(recipe(["int8_sq", "fp8"], [
        {"name": "h100", "gpu": "H100", "backend": "trtllm", "engine": "legacy", "work_pool": "p"}]), H100)
    assert [p.skip_reason for p in plan.pairs] == [None, None]


def test_the_legacy_engine_refuses_smoothquant_and_int4_weight_only_on_sm100_to_119():
    formats = ["int8_sq", "int4_awq", "fp8", "nvfp4"]
    pools = [{"name": "b200", "gpu": "B200", "backend": "trtllm", "engine": "legacy", "work_pool": "gpu-b200"},
             {"name": "b300", "gpu": "B300", "backend": "trtllm", "engine": "legacy", "work_pool": "gpu-b300"},
             {"name": "rtx", "gpu": "RTX-PRO-6000", "backend": "trtllm", "engine": "legacy", "work_pool": "gpu-rtx"},
             {"name": "b200-profile", "gpu": "B200", "backend": "trtllm", "work_pool": "gpu-b200"}]
    plan = make_plan(recipe(formats, pools), {"arch": "sm_100", "device": "cuda"}, dispatch=True)
    reasons = {(p.format, p.target): p.skip_reason for p in plan.pairs}
    for t in ("b200", "b300"):
        assert "SmoothQuant on SM 100-119" in reasons[("int8_sq", t)]
        assert "INT4 weight-only (W4A16 AWQ) on SM 100-119" in reasons[("int4_awq", t)]
        assert reasons[("fp8", t)] is None and reasons[("nvfp4", t)] is None
    # TensorRT-LLM's builder check is 100 <= sm < 120: sm_120 is not refused by it
    assert reasons[("int8_sq", "rtx")] is None and reasons[("int4_awq", "rtx")] is None
    assert "engine: legacy" in reasons[("int8_sq", "b200-profile")] and reasons[("int4_awq", "b200-profile")] is None


def test_trtllm_targets_need_a_gpu():
    plan = make_plan(recipe(["int4_awq"], [{"name": "local", "backend": "trtllm"}]), CPU)
    assert "NVIDIA GPUs" in plan.pairs[0].skip_reason


def test_the_legacy_engine_is_a_trtllm_setting():
    with pytest.raises(ValueError, match="engine 'legacy' is a TensorRT-LLM engine"):
        recipe(["fp8"], [{"name": "h100", "gpu": "H100", "engine": "legacy"}])
    assert recipe(["fp8"], [{"name": "h100"}]).targets[0].engine == "profile"
