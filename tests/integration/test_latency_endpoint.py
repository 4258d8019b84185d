"""The latency benchmark against a real OpenAI-compatible server on loopback (the reference server over a tiny
model), checked against a hand computation from the recorded chunk timestamps."""

import json

import httpx
import numpy as np
import pandas as pd
import pytest

from recipes.schema import LatencySpec, ReferenceTarget
from tasks.host import machine
from tasks.profiles import build
from tasks.validation import latency

pytestmark = pytest.mark.integration


@pytest.fixture()
def profile(tiny_model_dir):
    return build.build(model_slug="tiny", checkpoint_dir=str(tiny_model_dir), checkpoint_fp="base", fmt="none",
                       quant_algo=None, target=ReferenceTarget(name="local"), device=machine.local_device())


@pytest.fixture()
def holdout(tmp_path):
    from pydoc_data.topics import topics

    path = tmp_path / "holdout.parquet"
    pd.DataFrame({"text": list(topics.values())[:20]}).to_parquet(path)
    return str(path)


def test_server_speaks_openai_streaming_completions(profile, tmp_path):
    from tasks.backends import reference
    from tasks.backends.serving import free_port

    with reference.serve(profile.path, port=free_port(), log_file=tmp_path / "server.log") as url:
        assert httpx.get(f"{url}/models").json()["data"][0]["object"] == "model"
        plain = httpx.post(f"{url}/completions", json={"prompt": [5, 6, 7], "max_tokens": 5, "ignore_eos": True},
                           timeout=60).json()
        assert plain["usage"]["completion_tokens"] == 5
        with httpx.stream("POST", f"{url}/completions", timeout=60,
                          json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert sum(1 for c in chunks if c["choices"]) == 4 and chunks[-1]["usage"]["completion_tokens"] == 4
        bad = httpx.post(f"{url}/completions", json={"max_tokens": 3}, timeout=10)
        assert bad.status_code == 400


def test_metrics_agree_with_a_hand_computation_from_chunk_timestamps(profile, holdout):
    spec = LatencySpec(concurrency=[1, 3], request_rates=[5.0], requests=6, warmup=1, input_tokens=12,
                       output_tokens=6)
    result = latency.measure_latency(profile_dir=profile.path, profile_fp=profile.fingerprint,
                                       backend_name="reference", spec=spec, holdout_file=holdout,
                                       holdout_digest="h", device=machine.local_device())
    assert set(result.summary) >= {"concurrency=1", "concurrency=3", "rate=5"}
    requests = pd.read_parquet(f"{result.path}/requests.parquet")
    for name in ("concurrency=1", "concurrency=3", "rate=5"):
        rows = requests[requests.profile == name]
        s = result.summary[name]
        assert s["requests"] == 6 and s["failed"] == 0 and s["output_tokens"] == 36
        ttft = [r.token_times[0] - r.start for r in rows.itertuples()]
        tpot = [(r.token_times[-1] - r.token_times[0]) / (r.output_tokens - 1) for r in rows.itertuples()]
        itl = np.concatenate([np.diff(r.token_times) for r in rows.itertuples()])
        assert all(len(r.token_times) == 6 for r in rows.itertuples())
        assert s["ttft_ms_p95"] == pytest.approx(1000 * np.percentile(ttft, 95))
        assert s["tpot_ms_p50"] == pytest.approx(1000 * np.percentile(tpot, 50))
        assert s["itl_ms_p99"] == pytest.approx(1000 * np.percentile(itl, 99))
        assert s["client_parse_ms_per_chunk"] >= 0
    assert result.summary["rate=5"]["rate"] == 5.0 and result.summary["concurrency=3"]["concurrency"] == 3


def test_failed_requests_are_counted_not_crashed():
    import asyncio

    async def go():
        return await latency.run_load("http://127.0.0.1:9/v1", "m", [[1, 2]], output_tokens=2, concurrency=1,
                                        timeout_s=2)

    records, _ = asyncio.run(go())
    summary = latency.summarize(records, 1.0)
    assert summary["failed"] == 1 and summary["requests"] == 0 and records[0]["error"]
