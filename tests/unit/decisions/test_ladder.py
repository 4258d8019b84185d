from tasks.decisions.ladder import choose, compare_versions, keep_going


def rungs():
    # int4_awq passes but serves slower on this target than fp8, which also passes; int8_sq fails
    return [{"format": "int4_awq", "status": "pass", "reason": "ok", "latency": {"output_tokens_per_s": 90.0}},
            {"format": "int8_sq", "status": "fail", "reason": "ppl", "latency": {"output_tokens_per_s": 150.0}},
            {"format": "fp8", "status": "pass", "reason": "ok", "latency": {"output_tokens_per_s": 120.0}}]


def test_first_passing_and_best_measured_pick_different_winners():
    assert choose(rungs(), strategy="first_passing", metric="output_tokens_per_s").format == "int4_awq"
    best = choose(rungs(), strategy="best_measured", metric="output_tokens_per_s")
    assert best.format == "fp8" and "120.0" in best.reason and "int4_awq 90.0" in best.reason


def test_lower_is_better_metrics():
    r = rungs()
    r[0]["latency"]["ttft_ms_p95"], r[2]["latency"]["ttft_ms_p95"] = 50.0, 80.0
    assert choose(r, strategy="best_measured", metric="ttft_ms_p95").format == "int4_awq"


def test_no_passing_rung_chooses_nothing_and_keeps_every_reason():
    r = [dict(x, status="fail", reason=f"{x['format']} too lossy") for x in rungs()]
    choice = choose(r, strategy="first_passing", metric="output_tokens_per_s")
    assert choice.format is None
    assert all(f"{x['format']} too lossy" in choice.reason for x in r)


def test_first_passing_stops_after_a_pass():
    assert keep_going("first_passing", ["fail"]) and not keep_going("first_passing", ["fail", "pass"])
    assert keep_going("best_measured", ["pass"])


REFERENCE = "reference runtime (fake quantization): not a deployment number"


def test_best_measured_on_a_reference_runtime_ranks_by_serving_cost_and_says_why():
    r = rungs()
    r[0]["latency"]["output_tokens_per_s"] = 1.0  # int4_awq is slowest under fake quantization, cheapest to serve
    choice = choose(r, strategy="best_measured", metric="output_tokens_per_s", arch="sm_90", speed_note=REFERENCE)
    assert choice.format == "int4_awq"
    assert "lowest serving cost" in choice.reason and "latency did not decide: " + REFERENCE in choice.reason
    assert choose(r, strategy="best_measured", metric="output_tokens_per_s", arch="sm_90").format == "fp8"


def test_first_passing_says_latency_did_not_decide():
    choice = choose(rungs(), strategy="first_passing", metric="output_tokens_per_s", speed_note=REFERENCE)
    assert choice.format == "int4_awq" and REFERENCE in choice.reason


def test_speed_measured_on_a_busy_host_does_not_rank():
    r = rungs()
    r[2]["latency"] |= {"host_reliable": False, "host_load": {"note": "unreliable: other processes used 1.5 of 2"}}
    choice = choose(r, strategy="best_measured", metric="output_tokens_per_s", arch="sm_90")
    assert choice.format == "int4_awq" and "busy host" in choice.reason and "1.5 of 2" in choice.reason


def version(fmt, tps, **extra):
    return {"quant_format": fmt, "gpu_arch": "sm_90", "accuracy_degradation": "0.01",
            "metric.output_tokens_per_s": str(tps), "latency_decides": "true", "latency_reliable": "true",
            "latency_conditions": "trtllm/sm_90/H100/tp1/concurrency=1/in64-out32", **extra}


def test_champion_speed_compared_only_under_the_same_conditions():
    kw = {"strategy": "best_measured", "metric": "output_tokens_per_s"}
    fast_fp8, slow_int4 = version("fp8", 120), version("int4_awq", 90)
    assert compare_versions(fast_fp8, slow_int4, **kw) == (True, "output_tokens_per_s compared under the same "
                                                                 "measurement conditions")
    # different load profile: speed is not compared; int4_awq (W4) is cheaper to serve than fp8 (W8)
    other = version("int4_awq", 90, latency_conditions="trtllm/sm_90/H100/tp1/concurrency=8/in64-out32")
    wins, why = compare_versions(fast_fp8, other, **kw)
    assert not wins and "different conditions" in why and "serving cost" in why
    busy = version("int4_awq", 90, latency_reliable="false", latency_host_load="unreliable: other processes")
    wins, why = compare_versions(fast_fp8, busy, **kw)
    assert not wins and "busy host" in why
    reference = version("int4_awq", 90, latency_decides="false", latency_note=REFERENCE)
    wins, why = compare_versions(fast_fp8, reference, **kw)
    assert not wins and REFERENCE in why


def test_first_passing_champion_ranking_is_serving_cost_then_accuracy():
    kw = {"strategy": "first_passing", "metric": "output_tokens_per_s"}
    assert compare_versions(version("int4_awq", 1), version("fp8", 500), **kw)[0]
    better = version("fp8", 1, accuracy_degradation="0.001")
    assert compare_versions(better, version("fp8", 1), **kw)[0]
    assert not compare_versions(version("fp8", 1), version("fp8", 1), **kw)[0]
