"""Contract tests of the trtllm backend against a fake `tensorrt_llm` (tests/fakes), never the real one.

The fake accepts only TensorRT-LLM's documented argument names, records every call (to a JSON-lines file, since
builds run in a child process), writes the files the real library writes (autotuner cache, engine directory) and
serves /health as a fake trtllm-serve. What these tests cannot show: that the real TensorRT-LLM behaves as the fake
does, on a real GPU. See the README section "TensorRT-LLM backend: what was verified".
"""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from recipes.schema import TrtllmTarget
from tasks import store
from tasks.backends import trtllm
from tasks.backends.trtllm import common as trtllm_common
from tasks.backends.trtllm import eval as trtllm_eval
from tasks.backends.trtllm import server as trtllm_serve
from tasks.host import machine
from tasks.profiles import build, profile

FAKES = Path(__file__).resolve().parents[2] / "fakes"
H100 = {"arch": "sm_90", "device": "cuda", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1,
        "gpu_memory_gib": 79.2, "driver": "575.57.08", "cuda": "12.9"}
B200 = {**H100, "arch": "sm_100", "gpu_name": "NVIDIA B200", "gpu_memory_gib": 178.4}
CPU = {"arch": "cpu-x86_64", "device": "cpu", "gpu_name": None, "gpu_count": 0, "driver": None, "cuda": None}


class Calls:
    """The fake's call log (JSON lines, from this process and its children)."""

    def __init__(self, path: Path):
        self.path = path

    def all(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def named(self, call: str) -> list[dict]:
        return [c for c in self.all() if c["call"] == call]

    def one(self, call: str) -> dict:
        found = self.named(call)
        assert len(found) == 1, f"expected one {call} call, got {len(found)}: {found}"
        return found[0]


def _drop_fake_modules() -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in ("tensorrt_llm", "tensorrt")]:
        del sys.modules[name]


@pytest.fixture()
def fake(tmp_path, monkeypatch) -> Calls:
    """The fake tensorrt_llm (and tensorrt) importable for this test only, here and in child processes."""
    calls = Calls(tmp_path / "trtllm-calls.jsonl")
    monkeypatch.setenv("FAKE_TRTLLM_LOG", str(calls.path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(FAKES), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.syspath_prepend(str(FAKES))
    _drop_fake_modules()
    yield calls
    _drop_fake_modules()


@pytest.fixture()
def fake_serve(fake, tmp_path, monkeypatch) -> Path:
    """A `trtllm-serve` on PATH that runs tests/fakes/trtllm_serve.py."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "trtllm-serve"
    exe.write_text(f"#!{sys.executable}\nimport runpy\n"
                   f"runpy.run_path({str(FAKES / 'trtllm_serve.py')!r}, run_name='__main__')\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return exe


@pytest.fixture()
def upstream(monkeypatch):
    """lm-eval's trtllm module, with the names the backend binds restored after the test.

    Imported (if not yet) where tensorrt_llm cannot be, as on a machine without it: lm-eval then lacks the names
    it imports from tensorrt_llm, and the backend must bind them.
    """
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tensorrt_llm", None)
        from lm_eval.models import trtllm_causallms

    for name in ("LLM", "SamplingParams", "KvCacheConfig"):
        monkeypatch.setattr(trtllm_causallms, name, getattr(trtllm_causallms, name, None), raising=False)
    return trtllm_causallms


def target(**kw) -> TrtllmTarget:
    return TrtllmTarget(**{"name": "h100", "gpu": "H100", "backend": "trtllm", "work_pool": "gpu-h100", **kw})


def checkpoint(tmp_path: Path, tiny_model_dir: Path, quant_algo: str | None = None, kv: str | None = None) -> Path:
    """The tiny checkpoint, as a ModelOpt unified export when quant_algo is given (hf_quant_config.json)."""
    out = tmp_path / f"ckpt-{quant_algo or 'none'}-{kv or 'none'}"
    store.link_or_copy_tree(tiny_model_dir, out)
    if quant_algo:
        (out / "hf_quant_config.json").write_text(json.dumps({
            "producer": {"name": "modelopt", "version": "0.47.0"},
            "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": kv, "exclude_modules": ["lm_head"]}}))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_into(tmp_path, ckpt, t, device=H100) -> tuple[Path, dict]:
    out = tmp_path / "profile"
    out.mkdir()
    return out, trtllm.build_profile(checkpoint_dir=str(ckpt), target=t, device=device, out=out)


# --- without TensorRT-LLM --------------------------------------------------------------------------------------


def test_module_imports_nothing_heavy():
    code = ("import sys, tasks.backends.trtllm; "
            "print(sorted(m for m in ('tensorrt_llm', 'tensorrt', 'lm_eval', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "[]"


def test_every_entry_point_fails_at_once_without_tensorrt_llm(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import tensorrt_llm raises ImportError
    out = tmp_path / "out"
    out.mkdir()
    calls = {
        "toolchain_versions": lambda: trtllm.toolchain_versions(),
        "build_profile": lambda: trtllm.build_profile(checkpoint_dir=str(tiny_model_dir), target=target(),
                                                      device=H100, out=out),
        "lm_eval_model": lambda: trtllm.lm_eval_model(out, batch_size=1, max_length=64),  # before `with`
        "serve": lambda: trtllm.serve(out, port=8000, log_file=tmp_path / "serve.log"),
        "build.build": lambda: build.build(model_slug="m", checkpoint_dir=str(tiny_model_dir), checkpoint_fp="f",
                                           fmt="none", quant_algo=None, target=target(), device=H100),
    }
    for name, call in calls.items():
        with pytest.raises(trtllm_common.BackendUnavailable) as err:
            call()
        message = str(err.value)
        assert "nvcr.io/nvidia/tensorrt-llm/release:" in message, name
        assert "pip install tensorrt_llm" in message and "import tensorrt_llm failed" in message, name
    assert list(out.iterdir()) == [] and not (tmp_path / "serve.log").exists()


# --- toolchain --------------------------------------------------------------------------------------------------


def test_toolchain_records_the_installed_tensorrt_llm_and_tensorrt(fake, monkeypatch):
    versions = trtllm.toolchain_versions()
    full = machine.toolchain()
    # 1.3.0rc21 (the image pin): no TensorRT backend, no tensorrt dependency
    assert versions == {"tensorrt_llm": "1.3.0rc21", "modelopt": full["modelopt"], "torch": full["torch"],
                        "transformers": full["transformers"]}
    assert set(versions) <= set(trtllm.TOOLCHAIN_KEYS)
    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.3.0rc20")
    _drop_fake_modules()
    assert trtllm.toolchain_versions()["tensorrt"] == "10.13.3.9"


@pytest.mark.parametrize("release, has_engine_backend", [("1.2.1", True), ("1.3.0rc20", True),
                                                         ("1.3.0rc21", False), ("1.3.0", False)])
def test_the_fake_mirrors_what_each_release_ships(fake, monkeypatch, release, has_engine_backend):
    """v1.3.0rc20 was the last release with the TensorRT backend: from rc21 on `_tensorrt_engine` and `tensorrt`
    are gone, and the plan's rule (targets.ENGINE_RELEASES) draws the same line."""
    from tasks.decisions.targets import engine_reason

    monkeypatch.setenv("FAKE_TRTLLM_VERSION", release)
    _drop_fake_modules()
    assert importlib.import_module("tensorrt_llm").__version__ == release
    for module in ("tensorrt_llm._tensorrt_engine", "tensorrt"):
        if has_engine_backend:
            importlib.import_module(module)
        else:
            with pytest.raises(ModuleNotFoundError):
                importlib.import_module(module)
    assert (engine_reason("legacy", release) is None) == has_engine_backend


# --- build: deployment profile (PyTorch runtime) ----------------------------------------------------------------


def test_profile_build_writes_options_loads_warms_up_and_keeps_the_autotuner_cache(fake, tmp_path, tiny_model_dir):
    ckpt = checkpoint(tmp_path, tiny_model_dir, "FP8", "FP8")
    out, options = build_into(tmp_path, ckpt, target(max_batch_size=16, kv_cache_dtype="fp8"))

    # the checkpoint is hard-linked, not copied
    assert os.stat(out / "checkpoint" / "model.safetensors").st_ino == os.stat(ckpt / "model.safetensors").st_ino
    expected = {"max_batch_size": 16, "max_num_tokens": 4096, "max_seq_len": 2048, "tensor_parallel_size": 1,
                "kv_cache_config": {"dtype": "fp8"},
                "cuda_graph_config": {"batch_sizes": [1, 2, 4, 8, 16], "enable_padding": True}}
    assert yaml.safe_load((out / "extra_llm_api_options.yaml").read_text()) == expected

    # LLM(model=..., **options) with LlmArgs names and config classes, in a child process
    load = fake.one("pytorch.LLM")
    assert load["pid"] != os.getpid()
    assert {k: v for k, v in load.items() if k not in ("call", "pid")} == {
        "model": str(out / "checkpoint"), "max_batch_size": 16, "max_num_tokens": 4096, "max_seq_len": 2048,
        "tensor_parallel_size": 1, "kv_cache_config": {"type": "KvCacheConfig", "dtype": "fp8"},
        "cuda_graph_config": {"type": "CudaGraphConfig", "batch_sizes": [1, 2, 4, 8, 16], "enable_padding": True}}

    # a few generate calls at the batch sizes serving uses, then shutdown
    generates = fake.named("pytorch.LLM.generate")
    assert [len(g["inputs"]) for g in generates] == [1, 4, 16]
    assert all(p == {"type": "SamplingParams", "max_tokens": 8} for g in generates for p in g["sampling_params"])
    order = [c["call"] for c in fake.all() if c["call"].startswith("pytorch.")]
    assert order == ["pytorch.LLM"] + ["pytorch.LLM.generate"] * 3 + ["pytorch.LLM.shutdown"]

    # the autotuner cache TensorRT-LLM wrote to $TLLM_AUTOTUNER_CACHE_PATH is part of the profile
    cache = json.loads((out / "autotuner" / "autotuner_cache.json").read_text())
    assert set(cache) == {"metadata", "rank_0"}
    assert fake.one("autotuner.save_cache")["path"] == str(out / "autotuner" / "autotuner_cache.json")

    assert options["runtime"] == "pytorch" and options["tensorrt_llm"] == "1.3.0rc21"
    assert options["gpu"] == {k: H100[k] for k in ("arch", "gpu_name", "gpu_count", "gpu_memory_gib", "driver",
                                                   "cuda")}
    assert options["llm_api_options"] == expected and options["options_file"] == "extra_llm_api_options.yaml"
    assert options["autotuner_cache"] == ["autotuner/autotuner_cache.json"] and options["autotuner_note"] is None
    assert options["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    assert [w["prompts"] for w in options["warmup"]] == [1, 4, 16]
    assert options["build_log"] == "build.log" and (out / "build.log").is_file()
    json.dumps(options)  # recorded in the manifest


def test_profile_without_an_autotuner_cache_says_so(fake, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_AUTOTUNER", "0")
    out, options = build_into(tmp_path, tiny_model_dir, target())
    assert options["autotuner_cache"] is None and "trtllm-serve will tune at start-up" in options["autotuner_note"]
    assert not (out / "autotuner").exists()


def test_a_failed_load_reports_the_tail_of_the_build_log(fake, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_LOAD_ERROR", "CUDA out of memory while loading the fake model")
    with pytest.raises(trtllm.TrtllmError) as err:
        build_into(tmp_path, tiny_model_dir, target())
    assert "exit code 1" in str(err.value) and "CUDA out of memory while loading the fake model" in str(err.value)


@pytest.mark.parametrize("t, device, quant, message", [
    (dict(), CPU, None, "no CUDA device"),
    (dict(gpu="B200"), H100, None, "is for sm_100 (B200) but this worker's GPU is sm_90"),
    (dict(tp=2), H100, None, "tp=2 needs 2 GPUs; this worker has 1"),
    (dict(), H100, ("W8A8_SQ_PER_CHANNEL", None), "set targets[].engine: legacy"),
    (dict(name="b200", gpu="B200", engine="legacy"), B200, ("W8A8_SQ_PER_CHANNEL", None), "builder.py"),
    (dict(name="b200", gpu="B200", engine="legacy"), B200, ("W4A16_AWQ", None), "builder.py"),
    (dict(engine="legacy", kv_cache_dtype="fp8"), H100, ("FP8", None), "kv_cache_quant_algo is None"),
    (dict(engine="legacy"), H100, ("W8A8_SQ_PER_CHANNEL", None), "is a unified HF export"),
    (dict(name="b200", gpu="B200"), B200, ("W4A16_AWQ", None), "(TensorRT-LLM 1.2.1); allowed"),
    (dict(name="rtx", gpu="RTX-5090"), {**H100, "arch": "sm_120"}, ("W4A8_AWQ", None), "on sm_120"),
    (dict(), H100, ("NVFP4", None), "allowed: sm_100, sm_103, sm_120"),
])
def test_builds_that_cannot_work_are_refused_before_loading(fake, tmp_path, tiny_model_dir, t, device, quant,
                                                            message, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.2.1")  # a release with both engine kinds
    ckpt = checkpoint(tmp_path, tiny_model_dir, *(quant or (None, None)))
    with pytest.raises(trtllm.TrtllmError, match=re.escape(message)):
        build_into(tmp_path, ckpt, target(**t), device)
    assert not fake.named("pytorch.LLM") and not fake.named("tensorrt.LLM")
    assert not any((tmp_path / "profile").iterdir())


# --- build: legacy TensorRT engine ------------------------------------------------------------------------------


def trtllm_checkpoint(tmp_path: Path, tiny_model_dir: Path, tp: int, quant_algo="W8A8_SQ_PER_CHANNEL") -> Path:
    """What ModelOpt's export_tensorrt_llm_checkpoint writes for `tp` ranks (config.json: PretrainedConfig), with
    the tokenizer files the quantize stage saves next to it."""
    out = tmp_path / f"trtllm-ckpt-tp{tp}"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_model_dir / name).is_file():
            (out / name).write_bytes((tiny_model_dir / name).read_bytes())
    (out / "config.json").write_text(json.dumps({
        "architecture": "LlamaForCausalLM", "dtype": "float16",
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": None}}))
    for rank in range(tp):
        (out / f"rank{rank}.safetensors").write_bytes(b"fake weights")
    return out


def test_legacy_engine_build_uses_build_config_and_llm_save(fake, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.2.1")
    ckpt = trtllm_checkpoint(tmp_path, tiny_model_dir, tp=2)
    out, options = build_into(tmp_path, ckpt, target(engine="legacy", tp=2), {**H100, "gpu_count": 2})

    load = fake.one("tensorrt.LLM")
    assert {k: v for k, v in load.items() if k not in ("call", "pid")} == {
        "model": str(out / "checkpoint"), "tokenizer": str(out / "checkpoint"), "tensor_parallel_size": 2,
        "build_config": {"type": "BuildConfig", "max_batch_size": 8, "max_input_len": 2047, "max_seq_len": 2048,
                         "max_num_tokens": 4096}}
    assert fake.one("tensorrt.LLM.save")["engine_dir"] == str(out / "engine")
    assert sorted(p.name for p in (out / "engine").iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]
    engine_config = json.loads((out / "engine" / "config.json").read_text())
    assert engine_config["version"] == "1.2.1"
    assert engine_config["pretrained_config"]["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    assert options["quantization"] == {"quant_algo": "W8A8_SQ_PER_CHANNEL", "kv_cache_quant_algo": None}
    assert {k: engine_config["build_config"][k] for k in ("max_batch_size", "max_input_len", "max_seq_len",
                                                          "max_num_tokens")} == options["build_config"]
    assert [c["call"] for c in fake.all() if c["call"].startswith("tensorrt.LLM")] == \
        ["tensorrt.LLM", "tensorrt.LLM.save"] + ["tensorrt.LLM.generate"] * 3 + ["tensorrt.LLM.shutdown"]
    assert options["runtime"] == "legacy-engine" and options["engine_version"] == "1.2.1"
    assert options["engine_files"] == ["config.json", "rank0.engine", "rank1.engine"]
    assert not (out / "extra_llm_api_options.yaml").exists() and not (out / "autotuner").exists()
    assert not fake.named("pytorch.LLM")


def test_int8_sq_checkpoint_exported_for_another_tp_is_refused(fake, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.2.1")
    ckpt = trtllm_checkpoint(tmp_path, tiny_model_dir, tp=1)
    with pytest.raises(trtllm.TrtllmError, match="exported for tp=2.*world_size 1"):
        build_into(tmp_path, ckpt, target(engine="legacy", tp=2), {**H100, "gpu_count": 2})
    assert not fake.named("tensorrt.LLM")
    # the fake refuses the mismatch too, as ModelLoader reads rank{N}.safetensors for the LLM's own mapping
    from tensorrt_llm._tensorrt_engine import LLM
    with pytest.raises(ValueError, match="world_size 1"):
        LLM(str(ckpt), tensor_parallel_size=2)


@pytest.mark.parametrize("release", ["1.3.0rc21", "1.3.1"])
def test_legacy_engine_needs_a_tensorrt_llm_that_still_has_it(fake, tmp_path, tiny_model_dir, monkeypatch, release):
    monkeypatch.setenv("FAKE_TRTLLM_VERSION", release)
    with pytest.raises(trtllm.TrtllmError, match=rf"TensorRT-LLM {release}.*<=1\.3\.0rc20.*release:1\.2\.1"):
        build_into(tmp_path, tiny_model_dir, target(engine="legacy"))
    assert not any((tmp_path / "profile").iterdir())
    with pytest.raises(trtllm.TrtllmError, match=r"1\.3\.0rc20 was the last release with it"):
        trtllm_common.engine_llm_class(importlib.import_module("tensorrt_llm"))


# --- build through tasks.profiles.build: the manifest pins the toolchain ----------------------------------------------


def test_manifest_pins_tensorrt_llm_and_a_version_change_is_refused(fake, tiny_model_dir, monkeypatch,
                                                                     caplog):
    kwargs = dict(model_slug="tiny", checkpoint_dir=str(tiny_model_dir), checkpoint_fp="tiny-fp", fmt="none",
                  quant_algo=None, target=target(), device=H100)
    artifact = build.build(**kwargs)
    assert not artifact.cached and artifact.backend == "trtllm" and artifact.arch == "sm_90"
    manifest = artifact.manifest
    assert manifest["toolchain"]["tensorrt_llm"] == "1.3.0rc21" and "tensorrt" not in manifest["toolchain"]
    assert manifest["build_options"]["runtime"] == "pytorch"
    assert manifest["target"]["gpu_name"] == H100["gpu_name"] and manifest["target"]["driver"] == H100["driver"]
    assert manifest["target"]["gpu_memory_gib"] == H100["gpu_memory_gib"]
    assert (Path(artifact.path) / "autotuner" / "autotuner_cache.json").is_file()
    assert profile.verify_artifact(artifact.path, device=H100)["content_hash"] == artifact.fingerprint
    h20 = dict(H100, gpu_name="NVIDIA H20", gpu_memory_gib=95.6)  # same sm_90: loads, and says whose numbers they are
    with caplog.at_level("WARNING", logger="tasks.profiles.build"):
        assert profile.verify_artifact(artifact.path, device=h20)["content_hash"] == artifact.fingerprint
    assert "built and measured on NVIDIA H100 80GB HBM3; this machine has NVIDIA H20" in caplog.text
    assert "autotuned kernels" in caplog.text

    assert build.build(**kwargs).cached and len(fake.named("pytorch.LLM")) == 1  # same toolchain: reused

    monkeypatch.setattr(sys.modules["tensorrt_llm"], "__version__", "1.3.0rc22")
    with pytest.raises(profile.ArtifactMismatch, match="tensorrt_llm: built with 1.3.0rc21, installed here 1.3.0rc22"):
        profile.verify_artifact(artifact.path, device=H100)
    with pytest.raises(profile.ArtifactMismatch, match="architecture: built for sm_90, this machine is sm_100"):
        profile.verify_artifact(artifact.path, device=B200, toolchain=manifest["toolchain"])


# --- trtllm-serve -----------------------------------------------------------------------------------------------


def test_serve_starts_trtllm_serve_on_the_profile_and_stops_it(fake_serve, fake, tmp_path, tiny_model_dir):
    out, _ = build_into(tmp_path, tiny_model_dir, target())
    before = store.fingerprint_dir(out)
    port, log_file = free_port(), tmp_path / "logs" / "serve.log"
    with trtllm.serve(out, port=port, log_file=log_file) as url:
        assert url == f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"{url}/models", trust_env=False).json()["data"][0]["id"] == str(out / "checkpoint")
        started = fake.one("trtllm-serve")
        assert started["argv"] == [str(out / "checkpoint"), "--host", "127.0.0.1", "--port", str(port),
                                   "--backend", "pytorch", "--extra_llm_api_options",
                                   str(out / "extra_llm_api_options.yaml")]
        # the profile's autotuner cache, handed over as a copy (TensorRT-LLM rewrites the file it is given)
        assert not started["autotuner_cache_path"].startswith(str(out))
        assert started["autotuner_cache"] == json.loads((out / "autotuner" / "autotuner_cache.json").read_text())
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False)
    with pytest.raises(ProcessLookupError):
        os.kill(started["pid"], 0)
    text = log_file.read_text()
    assert text.startswith(f"$ {fake_serve} {out / 'checkpoint'} --host 127.0.0.1") and "shutting down" in text
    assert store.fingerprint_dir(out) == before  # serving leaves the profile as it was


def test_serve_a_legacy_engine_with_the_tensorrt_backend(fake_serve, fake, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.2.1")
    out, _ = build_into(tmp_path, tiny_model_dir, target(engine="legacy"))
    port = free_port()
    with trtllm.serve(out, port=port, log_file=tmp_path / "serve.log") as url:
        assert httpx.get(url.removesuffix("/v1") + "/health", trust_env=False).status_code == 200
    assert fake.one("trtllm-serve")["argv"] == [str(out / "engine"), "--host", "127.0.0.1", "--port", str(port),
                                                 "--backend", "tensorrt", "--tokenizer", str(out / "checkpoint")]
    assert fake.one("trtllm-serve")["autotuner_cache_path"] is None


def test_a_server_that_dies_at_start_is_reported_with_its_log(fake_serve, fake, tmp_path, tiny_model_dir,
                                                              monkeypatch):
    out, _ = build_into(tmp_path, tiny_model_dir, target())
    monkeypatch.setenv("FAKE_TRTLLM_SERVE_MODE", "crash")
    with pytest.raises(trtllm.TrtllmError, match=r"(?s)exited with code 3 .*CUDA out of memory"):
        with trtllm.serve(out, port=free_port(), log_file=tmp_path / "serve.log"):
            pytest.fail("must not be reached")


def test_a_server_that_never_gets_healthy_times_out_and_is_stopped(fake_serve, fake, tmp_path, tiny_model_dir,
                                                                   monkeypatch):
    out, _ = build_into(tmp_path, tiny_model_dir, target())
    monkeypatch.setenv("FAKE_TRTLLM_SERVE_MODE", "unhealthy")
    monkeypatch.setattr(trtllm_serve, "HEALTH_POLL_S", 0.2)
    log_file = tmp_path / "serve.log"
    with pytest.raises(trtllm.TrtllmError, match=r"(?s)did not answer 200 on .*/health within 2 s.*Uvicorn running"):
        with trtllm.serve(out, port=free_port(), log_file=log_file, startup_timeout=2.0):
            pytest.fail("must not be reached")
    assert "shutting down" in log_file.read_text()


def test_a_server_that_ignores_sigterm_is_killed(fake_serve, fake, tmp_path, tiny_model_dir, monkeypatch):
    out, _ = build_into(tmp_path, tiny_model_dir, target())
    monkeypatch.setenv("FAKE_TRTLLM_SERVE_MODE", "stubborn")
    monkeypatch.setattr(trtllm_serve, "SERVE_STOP_GRACE_S", 1.0)
    log_file = tmp_path / "serve.log"
    with trtllm.serve(out, port=free_port(), log_file=log_file):
        pid = fake.one("trtllm-serve")["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "shutting down" not in log_file.read_text()


def test_serve_needs_trtllm_serve_and_a_complete_profile(fake, tmp_path, tiny_model_dir, monkeypatch):
    out, _ = build_into(tmp_path, tiny_model_dir, target())
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(trtllm_common.BackendUnavailable, match="trtllm-serve is not on PATH"):
        trtllm.serve(out, port=free_port(), log_file=tmp_path / "serve.log")
    (out / "extra_llm_api_options.yaml").unlink()
    with pytest.raises(trtllm.TrtllmError, match="missing .*extra_llm_api_options.yaml"):
        trtllm_serve.serve_command(out, host="127.0.0.1", port=8000)


# --- lm-eval ----------------------------------------------------------------------------------------------------


def hand_made_profile(tmp_path, tiny_model_dir, t) -> Path:
    """A profile's files as build_profile writes them, without running a build."""
    out = tmp_path / "hand-profile"
    store.link_or_copy_tree(tiny_model_dir, out / "checkpoint")
    (out / "extra_llm_api_options.yaml").write_text(yaml.safe_dump(trtllm_common.runtime_options(t)))
    return out


def test_lm_eval_model_loads_the_profile_with_its_options(fake, upstream, tmp_path, tiny_model_dir):
    profile = hand_made_profile(tmp_path, tiny_model_dir, target(kv_cache_dtype="fp8", max_seq_len=512))
    lm_eval_llm = getattr(upstream, "LLM", None)
    with trtllm.lm_eval_model(profile, batch_size=2, max_length=128) as lm:
        assert isinstance(lm, upstream.TRTLLM) and lm.max_length == 128
        load = fake.one("pytorch.LLM")
        assert load["pid"] == os.getpid()
        assert {k: v for k, v in load.items() if k not in ("call", "pid")} == {
            "model": str(profile / "checkpoint"), "max_input_len": 128, "max_batch_size": 8, "max_num_tokens": 4096,
            "max_seq_len": 512, "tensor_parallel_size": 1,
            # block reuse off: reused KV blocks return no prompt logprobs
            "kv_cache_config": {"type": "KvCacheConfig", "dtype": "fp8", "enable_block_reuse": False},
            "cuda_graph_config": {"type": "CudaGraphConfig", "batch_sizes": [1, 2, 4, 8], "enable_padding": True}}
        assert upstream.LLM is lm_eval_llm  # lm-eval's own LLM name is back as it was
        assert not fake.named("pytorch.LLM.shutdown")
    assert len(fake.named("pytorch.LLM.shutdown")) == 1


def test_loglikelihood_reads_prompt_logprobs_aligned_to_the_next_token(fake, upstream, tmp_path, tiny_model_dir):
    from lm_eval.api.instance import Instance
    from tensorrt_llm import LLM, SamplingParams, fake_logprob, fake_rank

    profile = hand_made_profile(tmp_path, tiny_model_dir, target())
    requests = [Instance("loglikelihood", {}, ("The module docstring says", " hello world"), 0),
                Instance("loglikelihood", {}, ("Quantization", " reduces memory"), 1)]
    with trtllm.lm_eval_model(profile, batch_size=2, max_length=64) as lm:
        results = lm.loglikelihood(requests, disable_tqdm=True)
        encoded = [(lm.tok_encode(c), lm.tok_encode(c + x)) for c, x in (r.args for r in requests)]

    [generate] = fake.named("pytorch.LLM.generate")
    assert all(p == {"type": "SamplingParams", "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}
               for p in generate["sampling_params"])
    for (context, whole), (logprob, greedy) in zip(encoded, results):
        assert whole in generate["inputs"]
        continuation = range(len(context), len(whole))
        assert logprob == pytest.approx(sum(fake_logprob(whole[i], i) for i in continuation))
        assert greedy == all(fake_rank(whole[i]) == 1 for i in continuation)

    # lm-eval 0.4.13's own parser reads entry i for token i and cannot read TensorRT-LLM's alignment
    tokens = list(generate["inputs"][0])
    output = LLM(str(profile / "checkpoint")).generate(tokens, sampling_params=SamplingParams(max_tokens=1,
                                                                                               prompt_logprobs=1))
    with pytest.raises((KeyError, IndexError)):
        upstream.TRTLLM._parse_logprobs(tokens, output, 2)
    assert trtllm_eval.continuation_logprob(tokens, output, 2)[0] == pytest.approx(
        sum(fake_logprob(tokens[i], i) for i in range(2, len(tokens))))


def test_loglikelihood_on_tensorrt_llm_before_1_3_0rc11_fails_clearly(fake, upstream, tmp_path, tiny_model_dir,
                                                                     monkeypatch):
    from lm_eval.api.instance import Instance

    monkeypatch.setattr(importlib.import_module("tensorrt_llm"), "__version__", "1.2.1")
    profile = hand_made_profile(tmp_path, tiny_model_dir, target())
    with trtllm.lm_eval_model(profile, batch_size=1, max_length=64) as lm:
        with pytest.raises(trtllm.TrtllmError, match=r"TensorRT-LLM 1\.2\.1 cannot score .*1\.3\.0rc11"):
            lm.loglikelihood([Instance("loglikelihood", {}, ("a", " b"), 0)], disable_tqdm=True)
        with pytest.raises(trtllm.TrtllmError, match="1.3.0rc11"):
            lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("some text to score",), 0)],
                                     disable_tqdm=True)
    assert not fake.named("pytorch.LLM.generate")


def test_generate_until_passes_stop_strings_and_token_budget(fake, upstream, tmp_path, tiny_model_dir):
    from lm_eval.api.instance import Instance

    profile = hand_made_profile(tmp_path, tiny_model_dir, target())
    with trtllm.lm_eval_model(profile, batch_size=2, max_length=64) as lm:
        [text] = lm.generate_until([Instance("generate_until", {}, ("Q: 2+2?\nA:", {"until": ["\n"],
                                                                                   "max_gen_toks": 5}), 0)],
                                   disable_tqdm=True)
    assert text == " fake" * 5
    [params] = fake.one("pytorch.LLM.generate")["sampling_params"]
    assert params["max_tokens"] == 5 and "\n" in params["stop"]


def test_lm_eval_on_a_legacy_engine_loads_the_engine_and_refuses_loglikelihood(fake, upstream, tmp_path,
                                                                               tiny_model_dir, monkeypatch):
    from lm_eval.api.instance import Instance

    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.2.1")
    out, _ = build_into(tmp_path, tiny_model_dir, target(engine="legacy"))
    with trtllm.lm_eval_model(out, batch_size=1, max_length=4096) as lm:
        assert lm.max_length == 2047  # the engine's max_input_len bounds the context
        load = [c for c in fake.named("tensorrt.LLM") if c["pid"] == os.getpid()]
        assert [{k: v for k, v in c.items() if k not in ("call", "pid")} for c in load] == [{
            "model": str(out / "engine"), "tokenizer": str(out / "checkpoint"),
            "kv_cache_config": {"type": "KvCacheConfig", "enable_block_reuse": False}}]
        with pytest.raises(trtllm.TrtllmError, match="legacy TensorRT engine"):
            lm.loglikelihood([Instance("loglikelihood", {}, ("a", " b"), 0)], disable_tqdm=True)


def test_prompt_logprobs_have_one_entry_per_prompt_token(fake):
    """TensorRT-LLM scores prompt_token_ids[1:] + the first generated token against the context logits
    (executor/base_worker.py _compute_pytorch_prompt_logprobs): as many entries as prompt tokens."""
    from tensorrt_llm import LLM, SamplingParams

    tokens = [5, 9, 14, 20, 33]
    out = LLM(str(FAKES)).generate(tokens, sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=1))
    entries = out.outputs[0].prompt_logprobs
    assert len(entries) == len(tokens)
    assert all(tokens[i + 1] in entries[i] for i in range(len(tokens) - 1))
    assert out.outputs[0].token_ids[0] in entries[-1]


def test_long_prompts_need_chunked_prefill_below_max_seq_len(fake, upstream, tmp_path, tiny_model_dir):
    """The PyTorch runtime refuses a prompt longer than max_num_tokens unless chunked prefill is on
    (test_max_num_token_check); a profile with max_num_tokens < max_seq_len turns it on, so evaluation (and
    trtllm-serve, which reads the same options file) takes prompts up to max_seq_len."""
    from lm_eval.api.instance import Instance
    from tensorrt_llm import LLM, SamplingParams

    long_prompt = list(range(3, 43))  # 40 tokens
    with pytest.raises(ValueError, match=r"should not exceed max_num_tokens \(16\)"):
        LLM(str(tiny_model_dir), max_num_tokens=16).generate(long_prompt, sampling_params=SamplingParams())

    t = target(max_num_tokens=16, max_seq_len=512)
    assert trtllm_common.runtime_options(t)["enable_chunked_prefill"] is True
    assert "enable_chunked_prefill" not in trtllm_common.runtime_options(target(max_num_tokens=512, max_seq_len=512))
    profile = hand_made_profile(tmp_path, tiny_model_dir, t)
    context = " ".join(["quantization reduces the memory of large models"] * 4)
    with trtllm.lm_eval_model(profile, batch_size=1, max_length=256) as lm:
        [(logprob, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, " again"), 0)], disable_tqdm=True)
        assert len(lm.tok_encode(context)) > 16 and logprob < 0
    load = fake.named("pytorch.LLM")[-1]
    assert load["enable_chunked_prefill"] is True and load["max_num_tokens"] == 16


def test_int8_sq_is_exported_as_a_tensorrt_llm_checkpoint_for_the_targets_tp_and_built_from_it(
        fake, tmp_path, tiny_model_dir, monkeypatch):
    """ModelOpt's hf_ptq.py exports int8_sq with export_tensorrt_llm_checkpoint (the unified export does not list
    INT8-SQ); the legacy engine builder loads that checkpoint for the LLM's own tp."""
    from pydoc_data.topics import topics

    import pandas as pd

    from tasks import backends
    from tasks.quantization import quantize

    monkeypatch.setenv("FAKE_TRTLLM_VERSION", "1.2.1")  # ModelOpt's exporter imports tensorrt_llm too
    calib = tmp_path / "calib.parquet"
    pd.DataFrame({"text": [t[:300] for t in list(topics.values())[:8]]}).to_parquet(calib)
    q = quantize.quantize(model_dir=str(tiny_model_dir), model_fp="tiny", calibration_file=str(calib),
                          calib_digest="c", fmt="int8_sq", max_tokens=32, batch_size=4, trtllm_tps=(1, 2))
    assert q.quant_algo == "W8A8_SQ_PER_CHANNEL" and not Path(q.unified_dir).exists()
    for tp in (1, 2):
        ckpt = Path(q.path) / f"trtllm-tp{tp}"
        config = json.loads((ckpt / "config.json").read_text())
        assert config["mapping"]["world_size"] == tp and config["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
        assert sorted(p.name for p in ckpt.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp)]
        assert (ckpt / "tokenizer.json").is_file()
    legacy = target(engine="legacy", tp=2, trtllm_version="1.2.1")
    assert backends.checkpoint_for(q, legacy) == str(Path(q.path) / "trtllm-tp2")

    out, options = build_into(tmp_path, backends.checkpoint_for(q, legacy), legacy, {**H100, "gpu_count": 2})
    assert options["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    assert fake.one("tensorrt.LLM")["tensor_parallel_size"] == 2
    assert sorted(p.name for p in (out / "engine").iterdir()) == ["config.json", "rank0.engine", "rank1.engine"]
