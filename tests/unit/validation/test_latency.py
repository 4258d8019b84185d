import pytest

from tasks.validation import latency


def test_metrics_follow_the_serving_definitions():
    # two requests; token arrival times in seconds
    records = [{"start": 0.0, "token_times": [0.100, 0.120, 0.150, 0.170]},
               {"start": 1.0, "token_times": [1.200, 1.210, 1.230]}]
    s = latency.summarize(records, duration=1.23)
    # TTFT: 100 ms and 200 ms; TPOT: (170-100)/3 and (230-200)/2 ms; E2E: 170 and 230 ms
    assert s["ttft_ms_p50"] == pytest.approx(150)
    assert s["tpot_ms_mean"] == pytest.approx(((70 / 3) + 15) / 2)
    assert s["e2e_ms_p50"] == pytest.approx(200)
    # ITL pooled over requests: 20, 30, 20, 10, 20 ms
    assert s["itl_ms_mean"] == pytest.approx(20)
    assert s["output_tokens"] == 7
    assert s["output_tokens_per_s"] == pytest.approx(7 / 1.23)
    assert s["requests_per_s"] == pytest.approx(2 / 1.23)


def test_a_request_without_tokens_counts_as_failed():
    s = latency.summarize([{"start": 0, "token_times": []}, {"start": 0, "token_times": [0.1, 0.2]}], 0.2)
    assert s["failed"] == 1 and s["requests"] == 1


def test_prompts_have_the_exact_length(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = latency.fixed_length_prompts(["word " * 500], tok, count=5, input_tokens=17, seed=3)
    assert len(prompts) == 5 and all(len(p) == 17 for p in prompts)
    assert prompts == latency.fixed_length_prompts(["word " * 500], tok, count=5, input_tokens=17, seed=3)
    with pytest.raises(ValueError, match="latency.input_tokens"):
        latency.fixed_length_prompts(["short"], tok, count=1, input_tokens=50, seed=0)
