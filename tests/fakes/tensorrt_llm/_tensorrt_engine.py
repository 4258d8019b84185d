"""Fake `tensorrt_llm._tensorrt_engine`: the TensorRT-engine LLM (TrtLlmArgs), as in TensorRT-LLM <= 1.2.

`LLM(model=<HF dir>, build_config=...)` "builds"; `save(dir)` writes what `Engine.save` writes: `config.json`
({"version", "pretrained_config", "build_config"}) and one `rank{N}.engine` per rank. Loading an engine directory
builds nothing, and `save` then raises, as the real one does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tensorrt_llm as _fake
from tensorrt_llm import BASE_LLM_ARGS, TRT_ONLY_ARGS, BuildConfig, _BaseLLM, record

if os.environ.get("FAKE_TRTLLM_NO_ENGINE_BACKEND") == "1":
    raise ImportError("No module named 'tensorrt_llm._tensorrt_engine' (fake: removed in TensorRT-LLM 1.3)")


class LLM(_BaseLLM):
    backend = "tensorrt"
    ALLOWED = BASE_LLM_ARGS | TRT_ONLY_ARGS

    def _check(self, kwargs):
        super()._check(kwargs)
        kv = kwargs.get("kv_cache_config")
        if kv is not None and kv.dtype != "auto":
            raise ValueError("KvCacheConfig.dtype must be 'auto' for the TensorRT backend; the KV-cache precision "
                             "comes from quant_config.kv_cache_quant_algo")

    def __init__(self, model, tokenizer=None, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        config = Path(model) / "config.json"
        self._built = not (config.is_file() and "build_config" in json.loads(config.read_text()))
        if self._built:
            record("tensorrt.build", build_config=(kwargs.get("build_config") or BuildConfig()).to_dict())

    def save(self, engine_dir: str) -> None:
        record("tensorrt.LLM.save", engine_dir=str(engine_dir))
        if not self._built:
            raise RuntimeError("The engine is not built yet; save() needs an LLM built from a checkpoint")
        tp = self.args.get("tensor_parallel_size", 1)
        hf = json.loads((Path(self.args["model"]) / "config.json").read_text())
        quant_file = Path(self.args["model"]) / "hf_quant_config.json"
        quant = json.loads(quant_file.read_text())["quantization"] if quant_file.is_file() else {}
        out = Path(engine_dir)
        out.mkdir(parents=True, exist_ok=True)
        build_config = (self.args.get("build_config") or BuildConfig()).to_dict()
        for dropped in ("dry_run", "visualize_network"):  # Engine.save leaves these out
            build_config.pop(dropped)
        (out / "config.json").write_text(json.dumps({
            "version": _fake.__version__,
            "pretrained_config": {
                "architecture": (hf.get("architectures") or ["?"])[0], "dtype": "bfloat16",
                "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
                "quantization": {"quant_algo": quant.get("quant_algo"),
                                 "kv_cache_quant_algo": quant.get("kv_cache_quant_algo")}},
            "build_config": build_config}, indent=2))
        for rank in range(tp):
            (out / f"rank{rank}.engine").write_bytes(b"fake TensorRT plan for rank %d" % rank)
