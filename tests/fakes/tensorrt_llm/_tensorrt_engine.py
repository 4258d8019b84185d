"""Fake `tensorrt_llm._tensorrt_engine`: the TensorRT-engine LLM (TrtLlmArgs), as in TensorRT-LLM <= 1.3.0rc20.

`LLM(model=<HF dir or TensorRT-LLM checkpoint>, build_config=...)` "builds"; `save(dir)` writes what `Engine.save`
writes: `config.json` ({"version", "pretrained_config", "build_config"}) and one `rank{N}.engine` per rank. Loading
an engine directory builds nothing, and `save` then raises, as the real one does.

A TensorRT-LLM checkpoint (ModelOpt's `export_tensorrt_llm_checkpoint`: `config.json` with `architecture`,
`mapping`, `quantization` + `rank{N}.safetensors`) is loaded by `ModelLoader._load_model_from_ckpt`, which puts the
LLM's own mapping on it and reads `rank{N}.safetensors` for each rank: a checkpoint exported for another tp does not
load. An HF directory holding a ModelOpt INT8-SmoothQuant export is refused: ModelOpt's unified HF export does not
list INT8-SQ (docs/source/deployment/3_unified_hf.rst) and its hf_ptq.py exports int8_sq as a TensorRT-LLM
checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorrt_llm as _fake
from tensorrt_llm import BASE_LLM_ARGS, TRT_ONLY_ARGS, BuildConfig, _BaseLLM, record

if not _fake.has_tensorrt_backend():
    raise ModuleNotFoundError(f"No module named 'tensorrt_llm._tensorrt_engine' (fake TensorRT-LLM "
                              f"{_fake.__version__}: removed from 1.3.0rc21 on)")


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
        config = json.loads((Path(model) / "config.json").read_text())
        self._built = "build_config" not in config
        if self._built:
            self._check_checkpoint(Path(model), config, kwargs.get("tensor_parallel_size", 1))
            record("tensorrt.build", build_config=(kwargs.get("build_config") or BuildConfig()).to_dict())

    @staticmethod
    def _check_checkpoint(model: Path, config: dict, tp: int) -> None:
        if is_trtllm_checkpoint(config):
            world = config.get("mapping", {}).get("world_size", 1)
            missing = [f"rank{r}.safetensors" for r in range(tp) if not (model / f"rank{r}.safetensors").is_file()]
            if world != tp or missing:
                raise ValueError(f"TensorRT-LLM checkpoint {model} was exported for world_size {world}; "
                                 f"tensor_parallel_size={tp} needs {', '.join(missing) or 'a matching mapping'}")
            return
        quant_file = model / "hf_quant_config.json"
        algo = json.loads(quant_file.read_text())["quantization"].get("quant_algo") if quant_file.is_file() else None
        if algo and algo.startswith("W8A8_SQ"):
            raise ValueError(f"fake: {model} is a unified HF export of {algo}; ModelOpt's unified export does not "
                             f"support INT8-SmoothQuant (export it with export_tensorrt_llm_checkpoint)")

    def save(self, engine_dir: str) -> None:
        record("tensorrt.LLM.save", engine_dir=str(engine_dir))
        if not self._built:
            raise RuntimeError("The engine is not built yet; save() needs an LLM built from a checkpoint")
        tp = self.args.get("tensor_parallel_size", 1)
        hf = json.loads((Path(self.args["model"]) / "config.json").read_text())
        quant_file = Path(self.args["model"]) / "hf_quant_config.json"
        quant = json.loads(quant_file.read_text())["quantization"] if quant_file.is_file() else {}
        if is_trtllm_checkpoint(hf):
            quant = hf.get("quantization") or {}
            hf = {"architectures": [hf["architecture"]]}
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


def is_trtllm_checkpoint(config: dict) -> bool:
    """A TensorRT-LLM PretrainedConfig (what export_tensorrt_llm_checkpoint writes), not an HF config."""
    return "architecture" in config and "mapping" in config
