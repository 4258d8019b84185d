"""TPOT of the reference runtime with and without weight folding (tasks/backends/reference/backend.py load_model).

Loads a checkpoint as the reference backend does (a throw-away profile directory whose checkpoint/ links to it),
then times greedy decode steps with the KV cache after a fixed-length prompt: the median ms per output token, as the
latency stage's TPOT (first token excluded). Run from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/reference_fold_tpot.py \\
        .enginewright/quantized/fp8/<key>/fakequant [--baseline .enginewright/models/<key>] [--tokens 16]

Prints one JSON line per model: runtime, machine (cores, load average), fold, TPOT p50/mean ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml


def tpot(checkpoint: Path, *, fold: bool, tokens: int, prompt_tokens: int, threads: int | None) -> dict:
    import torch

    from tasks.backends.reference.backend import CHECKPOINT, RUNTIME_FILE, load_model

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp)
        (profile / CHECKPOINT).symlink_to(checkpoint.resolve())
        (profile / RUNTIME_FILE).write_text(yaml.safe_dump({"backend": "reference", "device": "cpu",
                                                           "dtype": "float32"}))
        started = time.perf_counter()
        model, _ = load_model(profile, fold=fold)
        load_s = time.perf_counter() - started
    ids = torch.arange(100, 100 + prompt_tokens).unsqueeze(0)
    steps = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(tokens - 1):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            steps.append(time.perf_counter() - t)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return {"checkpoint": str(checkpoint), "fold": fold, "load_s": round(load_s, 2),
            "tpot_ms_p50": round(1000 * statistics.median(steps), 1),
            "tpot_ms_mean": round(1000 * statistics.fmean(steps), 1), "tokens": tokens,
            "prompt_tokens": prompt_tokens, "runtime": "reference (transformers + ModelOpt fake quant), cpu float32",
            "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a quantized (fake-quant) checkpoint directory")
    parser.add_argument("--baseline", type=Path, help="the unquantized checkpoint, for the ratio")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    kw = {"tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "threads": args.threads}
    runs = [(args.baseline, False)] if args.baseline else []
    runs += [(args.checkpoint, False), (args.checkpoint, True)]
    for checkpoint, fold in runs:
        print(json.dumps(tpot(checkpoint, fold=fold, **kw)), flush=True)


if __name__ == "__main__":
    main()
