"""Targets run in parallel inside one flow run, and a failing target does not stop the others."""

import time

import pytest

pytestmark = pytest.mark.integration


def test_targets_fan_out_and_fail_independently(prefect_harness, tiny_model_dir, tiny_recipe, monkeypatch):
    from flows.pipeline import certify
    from tasks.backends import reference

    path = tiny_recipe("fanout", tiny_model_dir, registry={"name": "tiny"}, targets=[
        {"name": "a"}, {"name": "b", "max_batch_size": 4}, {"name": "broken", "max_batch_size": 2}])

    real_build = reference.build_profile

    def slow_or_broken(*, checkpoint_dir, target, device, out):
        if target.name == "broken":
            raise RuntimeError("simulated build failure on this target")
        time.sleep(2)  # long enough that two targets running one after the other could not overlap
        return real_build(checkpoint_dir=checkpoint_dir, target=target, device=device, out=out)

    monkeypatch.setattr(reference, "build_profile", slow_or_broken)
    state = certify(str(path), return_state=True)
    assert state.is_failed() and "broken" in state.message
    result = state.result(raise_on_failure=False)

    assert result["errors"] == ["target broken: RuntimeError: simulated build failure on this target"]
    statuses = {(r["format"], r["target"]): r["status"] for r in result["rows"]}
    assert statuses[("none", "a")] == statuses[("none", "b")] == "baseline"
    assert (statuses[("fp8", "a")] in ("pass", "fail", "undecided")
            and statuses[("fp8", "b")] in ("pass", "fail", "undecided"))
    windows = {}
    for s in result["stages"]:
        target = s["subject"].split("@")[-1]
        if s["stage"] == "build" and target in ("a", "b"):
            lo, hi = windows.get(target, (float("inf"), 0))
            windows[target] = (min(lo, s["started_at"]), max(hi, s["started_at"] + s["seconds"]))
    (a0, a1), (b0, b1) = windows["a"], windows["b"]
    assert a0 < b1 and b0 < a1, f"builds of a and b did not overlap: {windows}"

    # ModelOpt swaps transformers' attention function around each quantized forward; parallel targets must not
    # leave it swapped for models that run afterwards in this process
    import torch
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert plain(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 512)
