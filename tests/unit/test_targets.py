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
