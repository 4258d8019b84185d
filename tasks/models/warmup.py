"""ModelOpt's CUDA extensions, compiled ahead of work.

ModelOpt JIT-compiles its CUDA kernels (torch.utils.cpp_extension) the first time a quantizer needs them, about a
minute each on an H100/H200, inside whatever stage gets there first. `enginewright warmup` compiles them once per
worker (the GPU worker image runs it at start; TORCH_EXTENSIONS_DIR on a volume keeps them across restarts), and a
stage that would compile them says so first.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

# name given to torch.utils.cpp_extension.load -> ModelOpt's getter (modelopt.torch.quantization.extensions, 0.47)
EXTENSIONS = {"modelopt_cuda_ext": "get_cuda_ext", "modelopt_cuda_ext_fp8": "get_cuda_ext_fp8",
              "modelopt_cuda_ext_mx": "get_cuda_ext_mx"}


def _build_dir(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def uncompiled() -> list[str]:
    """The extensions this process would compile on first use (none without CUDA: ModelOpt then skips them)."""
    import torch

    if not torch.cuda.is_available():
        return []
    from modelopt.torch.quantization import extensions

    missing = []
    for name, getter in EXTENSIONS.items():
        if getattr(getattr(extensions, getter), "extension", None) is not None:
            continue  # already loaded in this process
        if not (_build_dir(name) / f"{name}.so").is_file():
            missing.append(name)
    return missing


def announce(stage: str) -> list[str]:
    """Log, before the stage starts, that it is about to compile ModelOpt's extensions (and how to avoid it)."""
    missing = uncompiled()
    if missing:
        log.warning("%s: ModelOpt's CUDA extensions %s are not compiled on this worker; they compile now, on first "
                    "use (about a minute each). Run `enginewright warmup` when the worker starts to do this ahead "
                    "of work.", stage, ", ".join(missing))
    return missing


def warmup() -> dict[str, dict]:
    """Compile (or load) every ModelOpt CUDA extension; returns {name: {"seconds", "compiled", "loaded"}}.

    Raises:
        RuntimeError: no CUDA device is visible (the extensions build for the GPU this runs on).
    """
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("warmup needs a CUDA GPU: ModelOpt compiles its extensions for the GPU it runs on "
                           "(run it when the GPU worker starts, not at image build without a GPU)")
    from concurrent.futures import ThreadPoolExecutor

    from modelopt.torch.quantization import extensions

    before = set(uncompiled())

    def one(item):  # each extension builds in its own directory: the compilers run in parallel
        name, getter = item
        started = time.perf_counter()
        ext = getattr(extensions, getter)()
        result = {"seconds": round(time.perf_counter() - started, 1), "compiled": name in before,
                  "loaded": ext is not None}
        log.info("%s: %s in %.1f s", name, "compiled" if name in before else "loaded", result["seconds"])
        return name, result

    with ThreadPoolExecutor(max_workers=len(EXTENSIONS)) as pool:
        return dict(pool.map(one, EXTENSIONS.items()))
