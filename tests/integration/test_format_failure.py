"""A format whose quantization fails for any reason is recorded with its error; the other formats and targets
go on, and the run still ends with its full record (issue: a GPT-2 export NotImplementedError killed the run)."""

import pytest

pytestmark = pytest.mark.integration


def test_a_failing_format_is_recorded_and_the_others_go_on(prefect_harness, tiny_gpt2, tiny_recipe, monkeypatch):
    from flows.pipeline import certify
    from tasks.quantization import quantize

    path = tiny_recipe("gpt2-formats", tiny_gpt2(320), model_name="gpt2-320", registry={"name": "gpt2"},
                         calibration={"source": "pydoc_topics", "samples": 4, "max_tokens": 32},
                         quantization={"formats": ["int8_sq", "fp8"]},
                         evaluation={"tasks": ["holdout_perplexity"], "limit": 4, "batch_size": 4, "max_length": 64})

    real = quantize._export_trtllm_checkpoints

    def broken_export(*args, **kwargs):
        raise NotImplementedError("Cannot pack weight (simulated export failure)")

    monkeypatch.setattr(quantize, "_export_trtllm_checkpoints", broken_export)
    state = certify(str(path), return_state=True)
    result = state.result(raise_on_failure=False)
    monkeypatch.setattr(quantize, "_export_trtllm_checkpoints", real)

    rows = {(r["format"], r["target"]): r for r in result["rows"]}
    assert rows[("int8_sq", "local")]["status"] == "skipped"
    assert "quantize failed: NotImplementedError: Cannot pack weight" in rows[("int8_sq", "local")]["reason"]
    assert rows[("fp8", "local")]["status"] in ("pass", "fail", "undecided")  # evaluated and gated
    assert result["errors"] == ["quantize int8_sq: NotImplementedError: Cannot pack weight (simulated export failure)"]
