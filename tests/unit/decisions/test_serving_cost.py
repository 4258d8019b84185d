from recipes.schema import QUANT_FORMATS
from tasks.decisions.serving_cost import SERVING_COST, cost_key, describe, has_kernels


def test_every_quantization_format_has_a_serving_cost():
    assert set(QUANT_FORMATS) <= set(SERVING_COST)


def test_fewer_weight_bits_serve_cheaper_then_fewer_activation_bits():
    order = sorted(["fp8", "int4_awq", "w4a8_awq", "none"], key=lambda f: cost_key(f, "sm_90"))
    assert order == ["w4a8_awq", "int4_awq", "fp8", "none"]


def test_a_format_without_kernels_on_the_arch_costs_more_than_any_with():
    assert not has_kernels("fp8", "sm_80") and has_kernels("int4_awq", "sm_80")
    assert cost_key("fp8", "sm_80") > cost_key("none", "sm_80")
    assert not has_kernels("fp8", "cpu-x86_64") and "no cpu-x86_64 kernels" in describe("fp8", "cpu-x86_64")


def test_mixed_precision_costs_its_effective_bits():
    assert cost_key("int4_awq", "sm_90", weight_bits=6.0) > cost_key("int4_awq", "sm_90")
    assert cost_key("int4_awq", "sm_90", weight_bits=6.0) < cost_key("fp8", "sm_90")
