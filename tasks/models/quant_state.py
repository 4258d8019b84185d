"""ModelOpt's quantizer state, stored apart from the base weights it applies to, and restored onto them.

What the reference backend needs to compute what the quantized model computes is small: ModelOpt's
``modelopt_state`` (modes, configs, each quantizer's attributes), the quantizers' buffers (amax, pre-quant scales)
and, for AWQ and SmoothQuant, the fp32 factors ModelOpt folded into linear weights. Restoring = load the base
checkpoint, ``mto.restore_from_modelopt_state``, load the buffers, refold the factors with ModelOpt's own
arithmetic; the result is bit-identical to the in-memory quantized model (tests/unit/test_quant_state.py).

Two files, both byte-deterministic (canonical JSON with sorted keys, safetensors; no pickle, so loading one cannot
run code), so two quantizations of the same inputs have one fingerprint:
  quant_state.json          {"base_fingerprint", "dtype", "folded", "modelopt_state"}
  quant_state.safetensors   quantizer buffers by state-dict name, folded factors under ``__folded__/<linear>/<i>``
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

STATE_JSON = "quant_state.json"
STATE_TENSORS = "quant_state.safetensors"
FOLD_PREFIX = "__folded__/"
STATE_PREFIX = "__state__/"
FORMAT_VERSION = 1


class QuantStateError(ValueError):
    """The stored quantizer state does not fit the base checkpoint it is applied to."""


def is_quant_state_dir(path: str | Path) -> bool:
    return (Path(path) / STATE_JSON).is_file()


@contextlib.contextmanager
def recording_folds() -> Iterator[dict]:
    """While quantizing, record each factor ModelOpt folds into a linear weight: yields {module: [factor, ...]}.

    AWQ and SmoothQuant multiply weights by ``1 / pre_quant_scale`` in fp32 and keep only a bf16 copy of the scale;
    the fp32 factor is what makes the refold exact.
    """
    from modelopt.torch.quantization import model_calib

    original = model_calib._apply_weight_pre_quant_scale
    folds: dict = {}

    def recording(linear, pre_quant_scale):
        if model_calib._ENABLE_FOLDING_PQS_TO_WEIGHTS:
            folds.setdefault(linear, []).append(pre_quant_scale.detach().squeeze().cpu().clone())
        return original(linear, pre_quant_scale)

    model_calib._apply_weight_pre_quant_scale = recording
    try:
        yield folds
    finally:
        model_calib._apply_weight_pre_quant_scale = original


def save(model, out: Path, *, base_fingerprint: str, folds: dict) -> list[str]:
    """Write the two state files for ``model`` (quantized, before export packs its weights); returns their names."""
    import modelopt.torch.opt as mto
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = {id(m): n for n, m in model.named_modules()}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in quantizer_buffers(model).items()}
    folded = []
    for module, factors in folds.items():
        name = names[id(module)]
        folded.append(name)
        for i, factor in enumerate(factors):
            tensors[f"{FOLD_PREFIX}{name}/{i}"] = factor.contiguous()
    weight = next(model.parameters())
    in_state: dict = {}
    doc = {"format_version": FORMAT_VERSION, "base_fingerprint": base_fingerprint,
           "dtype": str(weight.dtype).removeprefix("torch."), "folded": sorted(folded),
           "modelopt_state": encode(mto.modelopt_state(model), in_state)}
    tensors.update(in_state)
    (out / STATE_JSON).write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")))
    save_file(dict(sorted(tensors.items())), str(out / STATE_TENSORS))
    return [STATE_JSON, STATE_TENSORS]


def read(state_dir: str | Path) -> dict:
    return json.loads((Path(state_dir) / STATE_JSON).read_text())


def restore(model, state_dir: str | Path, *, base_fingerprint: str | None = None):
    """Apply the stored state onto ``model`` (the base checkpoint, loaded); returns the quantized model.

    Raises:
        QuantStateError: the state was made for another base checkpoint, or its buffers do not fit the model.
    """
    import modelopt.torch.opt as mto
    import torch
    from safetensors.torch import load_file

    state_dir = Path(state_dir)
    doc = read(state_dir)
    if base_fingerprint is not None and doc["base_fingerprint"] != base_fingerprint:
        raise QuantStateError(f"{state_dir / STATE_JSON}: quantizer state made for base checkpoint "
                              f"{doc['base_fingerprint'][:16]}, applied to {base_fingerprint[:16]}; re-quantize")
    tensors = load_file(str(state_dir / STATE_TENSORS))
    factors = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(FOLD_PREFIX)]}
    in_state = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(STATE_PREFIX)]}
    model = mto.restore_from_modelopt_state(model, modelopt_state=decode(doc["modelopt_state"], in_state))
    _colocate_quantizers(model)
    result = model.load_state_dict(tensors, strict=False)
    expected = set(quantizer_buffers(model))
    missing = sorted(expected & set(result.missing_keys))
    if result.unexpected_keys or missing:
        raise QuantStateError(f"{state_dir / STATE_TENSORS} does not fit the model: unexpected "
                              f"{result.unexpected_keys[:5]}, missing {missing[:5]}")
    _colocate_quantizers(model)
    with torch.no_grad():
        for key in sorted(factors, key=_fold_order):
            name = key[len(FOLD_PREFIX):].rsplit("/", 1)[0]
            linear = model.get_submodule(name)
            w = linear.weight
            # ModelOpt's own expression (model_calib._apply_weight_pre_quant_scale): same inputs, same bits
            w.data.copy_((w * factors[key].to(w.device).squeeze()[None, :]).to(w.dtype))
    return model


def quantizer_buffers(model) -> dict[str, Any]:
    """The state-dict entries that belong to ModelOpt's quantizers (amax, pre-quant scales, ...)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, TensorQuantizer))
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}


def _fold_order(key: str) -> tuple[str, int]:
    name, i = key.rsplit("/", 1)
    return name, int(i)


def _colocate_quantizers(model) -> None:
    """Put each quantizer on its layer's device (a model sharded over GPUs keeps quantizers with their weights)."""
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    kinds = (TensorQuantizer, SequentialQuantizer)
    for module in model.modules():
        quantizers = [c for c in module.children() if isinstance(c, kinds)]
        if not quantizers or isinstance(module, kinds):
            continue
        param = next((p for n, p in module.named_parameters() if "_quantizer" not in n), None)
        if param is not None:
            for q in quantizers:
                q.to(param.device)


# Canonical JSON for ModelOpt's state: tuples, torch.Size, dtypes and non-string dict keys are tagged so that
# decode(encode(x)) == x; tensors in it (SmoothQuant's _amax_for_smoothing) go to the safetensors file under
# ``__state__/<n>``, numbered in the (sorted) order they are met; anything else is refused rather than changed.

def encode(obj: Any, tensors: dict | None = None) -> Any:
    import torch

    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        name = f"{STATE_PREFIX}{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, torch.Size):
        return {"__size__": list(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") and k.endswith("__") for k in obj):
            return {k: encode(obj[k], tensors) for k in sorted(obj)}
        items = sorted(obj.items(), key=lambda kv: repr(kv[0]))
        return {"__items__": [[encode(k, tensors), encode(v, tensors)] for k, v in items]}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in the quantizer state: {obj!r}")


def decode(obj: Any, tensors: dict | None = None) -> Any:
    import torch

    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (tag, value), = obj.items()
            if tag == "__tensor__":
                return tensors[value]
            if tag == "__size__":
                return torch.Size(value)
            if tag == "__tuple__":
                return tuple(decode(v, tensors) for v in value)
            if tag == "__items__":
                return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in value}
            if tag == "__dtype__":
                return getattr(torch, value)
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
