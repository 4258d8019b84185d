import numpy as np
import pandas as pd
import pytest

from recipes.schema import GatesSpec
from tasks import backends
from tasks.decisions import gates


def ppl_items(ll, words=20):
    return pd.DataFrame({"task": "holdout_perplexity", "doc_id": range(len(ll)), "loglikelihood": ll,
                         "words": words, "bytes": 100})


def score_items(scores):
    return pd.DataFrame({"task": "holdout_cloze", "doc_id": range(len(scores)), "score": scores, "metric": "acc"})


def spec(**tasks):
    return GatesSpec.model_validate({"accuracy": {"tasks": tasks, "confidence": 0.95, "bootstrap": 2000}})


def test_perplexity_point_estimate_matches_hand_computation():
    base = ppl_items([-50.0, -60.0, -70.0])
    cand = ppl_items([-51.0, -61.5, -70.5])
    [v] = gates.accuracy_verdicts(base, cand, spec(holdout_perplexity={"max_relative_increase": 0.5}))
    hand = np.exp((51 + 61.5 + 70.5) / 60) / np.exp((50 + 60 + 70) / 60) - 1
    assert v.value == pytest.approx(hand)
    assert v.baseline == pytest.approx(np.exp(180 / 60))


def test_identical_models_pass():
    rng = np.random.default_rng(0)
    ll = list(rng.normal(-80, 10, 200))
    [v] = gates.accuracy_verdicts(ppl_items(ll), ppl_items(ll),
                                  spec(holdout_perplexity={"max_relative_increase": 0.02}))
    assert v.verdict == "pass" and v.value == 0 and v.bound == 0


def test_point_estimate_passes_but_bound_does_not_is_rejected():
    rng = np.random.default_rng(1)
    base = rng.normal(-80, 5, 300)
    cand = base - 1.2 + rng.normal(0, 1.5, 300)  # ~ +6% perplexity on average, noisy per item
    b, c = ppl_items(list(base)), ppl_items(list(cand))
    [v] = gates.accuracy_verdicts(b, c, spec(holdout_perplexity={"max_relative_increase": 0.065}))
    assert v.value < 0.065 < v.bound
    assert v.verdict == "fail" and "bound exceeds tolerance" in v.reason


def test_too_few_items_is_undecided_not_passed_or_failed():
    base = score_items([1, 0, 1, 1, 0, 1])
    cand = score_items([1, 0, 1, 0, 0, 1])
    [v] = gates.accuracy_verdicts(base, cand, spec(holdout_cloze={"max_drop": 0.2}))
    assert v.value == pytest.approx(1 / 6)
    assert v.verdict == "undecided" and "cannot resolve" in v.reason and "evaluation.limit" in v.reason


def test_clear_regression_fails_at_the_lower_bound():
    base = score_items([1] * 200)
    cand = score_items([0] * 100 + [1] * 100)
    [v] = gates.accuracy_verdicts(base, cand, spec(holdout_cloze={"max_drop": 0.05}))
    assert v.verdict == "fail" and "lower bound" in v.reason


def test_items_are_paired_by_doc_id():
    base = score_items([1, 0, 1, 0] * 50)
    cand = score_items([1, 0, 1, 0] * 50).sample(frac=1, random_state=0)  # same answers, shuffled rows
    [v] = gates.accuracy_verdicts(base, cand, spec(holdout_cloze={"max_drop": 0.01}))
    assert v.value == 0 and v.verdict == "pass"


def test_latency_slos_and_speedup():
    g = GatesSpec.model_validate({"latency": {"ttft_p95_ms": 100, "tpot_p95_ms": 10, "min_speedup": 1.2}})
    base = {"ttft_ms_p95": 90, "tpot_ms_p95": 9, "output_tokens_per_s": 100, "requests": 8}
    fast = {"ttft_ms_p95": 80, "tpot_ms_p95": 8, "output_tokens_per_s": 130, "requests": 8}
    slow = {"ttft_ms_p95": 120, "tpot_ms_p95": 8, "output_tokens_per_s": 110, "requests": 8}
    assert gates.decide(gates.latency_verdicts(base, fast, g)).status == "pass"
    failed = gates.decide(gates.latency_verdicts(base, slow, g))
    assert failed.status == "fail"
    assert {v.gate for v in failed.verdicts if v.verdict == "fail"} == {"ttft_p95_ms", "min_speedup"}


def test_decision_combines_fail_over_undecided_over_pass():
    mk = lambda s: gates.GateVerdict("g", None, None, None, None, 0.1, 1, s, s)
    assert gates.decide([mk("pass"), mk("undecided")]).status == "undecided"
    assert gates.decide([mk("undecided"), mk("fail")]).status == "fail"
    assert gates.decide([mk("pass")]).passed


def latency_gates(**extra):
    return GatesSpec.model_validate({"latency": {"ttft_p95_ms": 500, **extra}})


def test_reference_runtime_latency_is_reported_but_does_not_decide(tmp_path):
    note = gates.latency_note(backends.get("reference"), latency_gates())
    assert "reference runtime (fake quantization): not a deployment number" in note
    assert "on_reference_runtime" in note
    items = ppl_items([-50.0, -60.0, -70.0] * 10)
    items.to_parquet(tmp_path / "i.parquet")
    slow = {"ttft_ms_p95": 2400.0, "requests": 4}
    kw = dict(baseline_items_file=str(tmp_path / "i.parquet"), candidate_items_file=str(tmp_path / "i.parquet"),
              baseline_latency={"ttft_ms_p95": 100.0}, candidate_latency=slow)
    reported = gates.gate(**kw, gates=latency_gates(), latency_note=note)
    assert reported.status == "pass"
    [ttft] = reported.verdicts
    assert ttft.verdict == "fail" and not ttft.decides and "not deciding" in ttft.reason
    assert reported.reason == "all gates passed"
    opted_in = latency_gates(on_reference_runtime=True)
    assert gates.latency_note(backends.get("reference"), opted_in) is None
    assert gates.gate(**kw, gates=opted_in, latency_note=None).status == "fail"


def test_deployment_runtime_latency_decides():
    assert gates.latency_note(backends.get("trtllm"), latency_gates()) is None


def test_a_candidate_with_no_measured_latency_fails_its_slo_instead_of_crashing():
    verdicts = gates.latency_verdicts({"ttft_ms_p95": 50.0, "output_tokens_per_s": 10.0}, {"requests": 4},
                                      latency_gates(ttft_p95_ms=100, min_speedup=1.0))
    assert [v.verdict for v in verdicts] == ["fail", "fail"]
    assert "not measured" in verdicts[0].reason and "not measured" in verdicts[-1].reason


def test_a_candidate_failing_accuracy_needs_no_latency_and_its_latency_verdicts_say_not_measured(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.normal(-80, 5, 200)
    ppl_items(list(base)).to_parquet(tmp_path / "b.parquet")
    ppl_items(list(base)).to_parquet(tmp_path / "same.parquet")
    ppl_items(list(base - 8.0)).to_parquet(tmp_path / "bad.parquet")  # ~ +49% perplexity
    g = GatesSpec.model_validate({"accuracy": {"tasks": {"holdout_perplexity": {"max_relative_increase": 0.05}}},
                                  "latency": {"ttft_p95_ms": 500, "min_speedup": 1.1}})
    files = {"baseline_items_file": str(tmp_path / "b.parquet"), "gates": g}
    assert gates.latency_not_needed(candidate_items_file=str(tmp_path / "same.parquet"), **files) is None
    why = gates.latency_not_needed(candidate_items_file=str(tmp_path / "bad.parquet"), **files)
    assert why == "accuracy failed"
    from tasks.validation.latency import not_measured

    lat = not_measured(why, __import__("recipes.schema", fromlist=["LatencySpec"]).LatencySpec(concurrency=[1, 4]))
    assert set(lat.summary) == {"concurrency=1", "concurrency=4", "not_measured"}
    for note in (None, "reference runtime"):  # whether latency decides here or not, it is recorded, never judged
        d = gates.gate(baseline_latency={"ttft_ms_p95": 90.0, "output_tokens_per_s": 10.0},
                       candidate_latency=lat.summary["concurrency=1"], latency_note=note,
                       candidate_items_file=str(tmp_path / "bad.parquet"), **files)
        assert d.status == "fail" and d.reason.startswith("holdout_perplexity:")
        lv = [v for v in d.verdicts if v.bound is None]
        assert {v.gate for v in lv} == {"ttft_p95_ms", "min_speedup"}
        assert all(v.verdict == "not measured" and v.reason == "not measured: accuracy failed" and not v.decides
                   for v in lv)


def test_latency_load_is_the_smallest_that_fills_the_report_unless_latency_decides_or_the_recipe_asks():
    from recipes.schema import LatencySpec

    spec = LatencySpec(concurrency=[1, 4], request_rates=[2.0], requests=6, warmup=2)
    g = latency_gates(at_concurrency=1)
    assert gates.latency_load(spec, g, None) == (spec, None)  # latency decides: the recipe's load
    full = spec.model_copy(update={"full_on_reference": True})
    assert gates.latency_load(full, g, "reference runtime") == (full, None)
    small, why = gates.latency_load(spec, g, "reference runtime")
    assert (small.concurrency, small.request_rates, small.requests, small.warmup) == ([1], [], 3, 1)
    assert "concurrency=1 only" in why and "full_on_reference" in why
    assert gates.latency_load(spec, latency_gates(), "reference runtime")[0].concurrency == [4]  # max, as gated_load
    tiny = LatencySpec(concurrency=[1], requests=2, warmup=0)
    assert gates.latency_load(tiny, g, "reference runtime") == (tiny, None)  # already that small
