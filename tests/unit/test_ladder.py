from tasks.ladder import choose, keep_going, rank_key

FORMAT_COST = {"int4_awq": 1, "fp8": 3, "int8_sq": 3}


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


def test_champion_ranking_follows_the_strategy():
    cheap = {"quant_format": "int4_awq", "accuracy_degradation": "0.05", "metric.output_tokens_per_s": "90"}
    fast = {"quant_format": "fp8", "accuracy_degradation": "0.01", "metric.output_tokens_per_s": "120"}
    kw = {"metric": "output_tokens_per_s", "format_cost": FORMAT_COST}
    assert rank_key(cheap, strategy="first_passing", **kw) < rank_key(fast, strategy="first_passing", **kw)
    assert rank_key(fast, strategy="best_measured", **kw) < rank_key(cheap, strategy="best_measured", **kw)
