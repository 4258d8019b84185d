"""The GPU path of the pipeline on one CUDA machine, stage by stage, printing what it measured.

Runs import -> calibrate (CUDA forward passes) -> quantize (every format valid for some target: NVFP4, INT4-AWQ,
FP8) -> build on this GPU's arch (NVFP4 is skipped for sm_90 with its reason) -> validate (lm-eval + latency) ->
gates, with the same stage functions the Prefect flow calls, then promotes through MLflow (a SQLite file in the store)
and resolves what this GPU should serve. Prefect is not needed on the GPU host. The run record (stage times, manifests,
metrics, verdicts, registry tags) is written as JSON.

    python benchmarks/gpu/run_h100.py --recipe recipes/gpu-h100.yaml --out results.json \
        [--shaped-model-tokenizer DIR]   # no GGUF on the host: a SmolLM2-shaped Llama (random init) + this tokenizer
        [--latency-concurrency 1 4 --latency-requests 8]   # the latency load (default: the recipe's)

The record is rewritten after every stage ("complete": false until the end), so a killed run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def shaped_model(tokenizer_dir: Path, out: Path) -> Path:
    """SmolLM2-135M's architecture with random weights (seed 0), for hosts that cannot receive the real weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "gpu-h100.yaml"))
    ap.add_argument("--out", default="gpu-results.json")
    ap.add_argument("--shaped-model-tokenizer", type=Path)
    ap.add_argument("--set", action="append", default=[], help="recipe override key.path=value")
    ap.add_argument("--latency-concurrency", type=int, nargs="+",
                    help="latency load: concurrency levels (default: the recipe's latency.concurrency)")
    ap.add_argument("--latency-requests", type=int, help="latency load: requests per level (default: the recipe's)")
    args = ap.parse_args()

    from recipes.load import load_recipe
    from tasks import store
    from tasks.backends import target_runtime
    from tasks.calibration import calibrate
    from tasks.decisions import gates
    from tasks.decisions.targets import make_plan
    from tasks.host import machine
    from tasks.models import import_model
    from tasks.profiles import build
    from tasks.quantization import quantize
    from tasks.validation import accuracy, latency

    overrides = list(args.set)
    if args.latency_concurrency:
        overrides.append(f"latency.concurrency=[{', '.join(map(str, args.latency_concurrency))}]")
    if args.latency_requests:
        overrides.append(f"latency.requests={args.latency_requests}")
    if args.shaped_model_tokenizer:
        model_dir = shaped_model(args.shaped_model_tokenizer, store.home() / "shaped-smollm2")
        overrides += ["model.source=hf_dir", f"model.path={model_dir}"]
    recipe, base_dir = load_recipe(args.recipe, overrides)
    device = machine.local_device()
    plan = make_plan(recipe, device, runtime_of=target_runtime)
    record: dict = {"device": device, "toolchain": machine.toolchain(), "stages": [], "rows": [],
                    "plan": [p.__dict__ for p in plan.pairs], "recipe": recipe.model_dump(mode="json"),
                    "complete": False}
    out = Path(args.out)

    def flush() -> None:
        """Rewrite the record (atomically): a run killed part-way keeps every stage it measured."""
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, out)

    def timed(name, subject, fn, **kw):
        t = time.perf_counter()
        try:
            result = fn(**kw)
        except Exception as exc:
            record["stages"].append({"stage": name, "subject": subject, "error": f"{type(exc).__name__}: {exc}",
                                     "seconds": round(time.perf_counter() - t, 2)})
            flush()
            raise
        record["stages"].append({"stage": name, "subject": subject, "seconds": round(time.perf_counter() - t, 2),
                                 "cached": getattr(result, "cached", False)})
        print(f"{name:10s} {subject:24s} {record['stages'][-1]['seconds']:8.2f} s", flush=True)
        flush()
        return result

    flush()

    model = timed("import", recipe.model.slug, import_model.import_model, spec=recipe.model, base_dir=base_dir)
    calib = timed("calibrate", recipe.calibration.source, calibrate.calibrate, spec=recipe.calibration,
                  model_dir=model.path, base_dir=base_dir)
    quantized = {}
    for fmt in plan.formats_to_quantize:
        quantized[fmt] = timed("quantize", fmt, quantize.quantize, model_dir=model.path, model_fp=model.fingerprint,
                               calibration_file=calib.calibration_file, calib_digest=calib.digest, fmt=fmt,
                               kv_cache=recipe.quantization.kv_cache, max_tokens=recipe.calibration.max_tokens,
                               batch_size=recipe.calibration.batch_size)
        record.setdefault("quantized", {})[fmt] = {"quant_algo": quantized[fmt].quant_algo,
                                                   "awq_block_size": quantized[fmt].awq_block_size,
                                                   "hf_quant_config": store.read_manifest(
                                                       Path(quantized[fmt].path))["hf_quant_config"]}

    def validate(profile):
        acc = timed("accuracy", f"{profile.format}@{profile.target}", accuracy.evaluate, profile_dir=profile.path,
                    profile_fp=profile.fingerprint, backend_name=profile.backend, spec=recipe.evaluation,
                    holdout_file=calib.holdout_file)
        lat = timed("latency", f"{profile.format}@{profile.target}", latency.measure_latency,
                    profile_dir=profile.path, profile_fp=profile.fingerprint, backend_name=profile.backend,
                    spec=recipe.latency, holdout_file=calib.holdout_file, holdout_digest=calib.holdout_digest,
                    device=device)
        return acc, lat

    from registry import model_registry, promote
    from registry import tracking as registry
    from tasks.decisions import ladder

    run_id = registry.start_pipeline_run(experiment=recipe.name, run_name="gpu-path", recipe_file=Path(args.recipe),
                                         recipe_digest=recipe.digest(), params={"device": device["arch"]},
                                         tags={"model": recipe.model.slug})
    lineage = {"model_fingerprint": model.fingerprint, "calibration_digest": calib.digest,
               "recipe_sha": recipe.digest(), "source_run_id": run_id, "model_source": model.source}
    load = recipe.gated_load
    for target in recipe.targets:
        pairs = [p for p in plan.pairs if p.target == target.name]
        if target.name in plan.unplaced:
            record["rows"] += [{"format": p.format, "target": p.target, "status": "skipped", "reason": p.skip_reason}
                               for p in pairs]
            continue
        base = timed("build", f"none@{target.name}", build.build, model_slug=model.name, checkpoint_dir=model.path,
                     checkpoint_fp=model.fingerprint, fmt="none", quant_algo=None, target=target, device=device)
        base_acc, base_lat = validate(base)
        record["rows"].append({"format": "none", "target": target.name, "status": "baseline",
                               "accuracy": base_acc.metrics, "latency": base_lat.summary, "manifest": base.manifest})
        rungs, passing = [], []
        for p in pairs:
            if p.skip_reason:
                record["rows"].append({"format": p.format, "target": p.target, "status": "skipped",
                                       "reason": p.skip_reason})
                continue
            q = quantized[p.format]
            prof = timed("build", f"{p.format}@{target.name}", build.build, model_slug=model.name,
                         checkpoint_dir=q.fakequant_dir, checkpoint_fp=q.fingerprint, fmt=p.format,
                         quant_algo=q.quant_algo, target=target, device=device)
            acc, lat = validate(prof)
            decision = gates.gate(baseline_items_file=base_acc.items_file, candidate_items_file=acc.items_file,
                                  baseline_latency=base_lat.summary[load], candidate_latency=lat.summary[load],
                                  gates=recipe.gates)
            child = registry.start_child_run(run_id, run_name=f"{p.format}@{target.name}",
                                             params={"format": p.format, "arch": p.arch}, tags={})
            row = {"format": p.format, "target": target.name, "status": decision.status, "reason": decision.reason,
                   "accuracy": acc.metrics, "latency": lat.summary,
                   "verdicts": [v.as_dict() for v in decision.verdicts], "manifest": prof.manifest}
            record["rows"].append(row)
            rungs.append({"format": p.format, "status": decision.status, "reason": decision.reason,
                          "latency": lat.summary[load]})
            if decision.passed:
                passing.append((prof, decision, child, row))
        choice = ladder.choose(rungs, strategy=recipe.ladder.strategy, metric=recipe.ladder.metric)
        record.setdefault("decisions", {})[target.name] = choice.__dict__
        record.setdefault("promotions", []).extend(promote.promote(
            recipe=recipe, target=target, arch=plan.target_arch[target.name], passing=passing, choice=choice,
            lineage=lineage))
        try:
            record.setdefault("resolve", {})[target.name] = model_registry.resolve(
                name=model_registry.registered_name(recipe.registry.name, target.backend),
                arch=plan.target_arch[target.name])
        except LookupError as exc:
            record.setdefault("resolve", {})[target.name] = str(exc)
    record["complete"] = True
    flush()
    for row in record["rows"]:
        ppl = row.get("accuracy", {}).get("holdout_perplexity", {}).get("word_perplexity")
        print(f"{row['format']:9s} {row['target']:6s} {row['status']:9s} ppl={ppl} "
              f"ttft_p95={row.get('latency', {}).get(load, {}).get('ttft_ms_p95')} {row.get('reason', '')[:160]}")
    print(json.dumps({"decisions": record.get("decisions"), "promotions": record.get("promotions"),
                      "resolve": record.get("resolve")}, indent=1, default=str))


if __name__ == "__main__":
    main()
