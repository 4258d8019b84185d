"""The accuracy stage: lm-eval's `simple_evaluate` on a built profile, with per-item results kept for paired gates.

Local tasks (`tasks/validation/lm_eval_tasks/*.yaml`) read the held-out split of the calibration source; any other task
name is looked up in lm-eval's own task index (those download their data from the hub).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from recipes.schema import LOCAL_EVAL_TASKS, EvaluationSpec
from tasks import store
from tasks.host import machine

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
LM_EVAL_RESULTS = "lm_eval_results.json"
# lm-eval's stderr: analytic for means (acc), bootstrap only for its bootstrappable metrics; 0 would turn it off.
# The gates use their own paired bootstrap over items (tasks/decisions/gates.py); this is the harness's own report.
STDERR_BOOTSTRAP = 1000
EVAL_SEED = 1234


@dataclass(frozen=True)
class AccuracyResult:
    path: str
    metrics: dict  # task -> {metric: value}
    items_file: str  # per-item results (parquet): task, doc_id, and the task's per-item quantities
    n_items: dict
    seconds: float
    cached: bool = False


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def cloze_items(texts: list[str], seed: int = EVAL_SEED) -> list[dict]:
    """One item per text: its first sentence of 8+ words whose last word is alphabetic (4+ letters).

    Distractors come from the same paragraph when it has enough other words (plausible in context, so the task
    is not trivially easy), else from the whole held-out vocabulary.
    """
    vocabulary = sorted({w for t in texts for w in re.findall(r"\b[a-zA-Z]{4,}\b", t)})
    items = []
    for i, text in enumerate(texts):
        rng = random.Random(seed * 1_000_003 + i)
        for sentence in _sentences(text):
            tokens = sentence.split()
            last = tokens[-1].rstrip(".!?,;:")
            if len(tokens) < 8 or not re.fullmatch(r"[a-zA-Z]{4,}", last):
                continue
            local = sorted({w for w in re.findall(r"\b[a-zA-Z]{4,}\b", text) if w.lower() != last.lower()})
            pool = local if len(local) >= 3 else [w for w in vocabulary if w.lower() != last.lower()]
            distractors = rng.sample(pool, 3)
            choices = distractors + [last]
            rng.shuffle(choices)
            items.append({"context": " ".join(tokens[:-1]), "choices": choices, "label": choices.index(last)})
            break
    return items


def task_data(task: str, holdout: list[str], limit: int | None) -> list[dict]:
    if task == "holdout_perplexity":
        rows = [{"text": t} for t in holdout]
    else:
        rows = cloze_items(holdout)
    return rows[:limit] if limit else rows


def task_inputs(tasks: list[str], holdout_file: str, limit: int | None) -> dict[str, list[dict] | None]:
    """The items of each local task, built from the held-out split; None for lm-eval's own tasks."""
    holdout = pd.read_parquet(holdout_file)["text"].tolist()
    inputs: dict[str, list[dict] | None] = {}
    for task in tasks:
        if task not in LOCAL_EVAL_TASKS:
            inputs[task] = None
            continue
        rows = task_data(task, holdout, limit)
        if len(rows) < 2:
            raise ValueError(f"evaluation.tasks: {task} has {len(rows)} held-out item(s); raise "
                             f"calibration.holdout_fraction or use a larger source")
        inputs[task] = rows
    return inputs


def check_item_counts(spec: EvaluationSpec, holdout_file: str) -> None:
    """Every local task must get `evaluation.limit` items from the held-out split: a gate decided on fewer items
    than asked for is not the gate the recipe describes. Raises RecipeError (checked right after calibration)."""
    from recipes.schema import RecipeError

    if not spec.limit:
        return
    holdout = pd.read_parquet(holdout_file)["text"].tolist()
    short = {task: len(task_data(task, holdout, spec.limit)) for task in spec.tasks if task in LOCAL_EVAL_TASKS}
    short = {task: n for task, n in short.items() if n < spec.limit}
    if short:
        counts = ", ".join(f"{task} {n}" for task, n in short.items())
        raise RecipeError(f"evaluation.limit={spec.limit}, but the held-out split ({len(holdout)} texts) gives only "
                          f"{counts} item(s): lower evaluation.limit to {min(short.values())}, or raise "
                          f"calibration.holdout_fraction or use a larger calibration source")


def task_configs(inputs: dict[str, list[dict] | None], data_dir: Path) -> list:
    """lm-eval task configs: local YAMLs pointed at the written items; other task names pass through."""
    configs: list = []
    for task, rows in inputs.items():
        if rows is None:
            configs.append(task)
            continue
        data = data_dir / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = yaml.safe_load((TASK_DIR / f"{task}.yaml").read_text())
        config["dataset_kwargs"]["data_files"]["test"] = str(data.resolve())
        configs.append(config)
    return configs


def cache_key(*, profile_fp: str, spec: EvaluationSpec, inputs: dict) -> str:
    """Keyed on the items themselves (not just the held-out file), the task YAMLs, harness and this code. The
    backend's code (how it runs the model for lm-eval) is in the profile's fingerprint already (build key)."""
    import sys

    yamls = {p.name: p.read_text() for p in sorted(TASK_DIR.glob("*.yaml"))}
    return store.key_of("evaluate", profile_fp, spec.model_dump(mode="json"), inputs, machine.version_of("lm_eval"),
                        yamls, store.source_digest(sys.modules[__name__]))


def per_item_rows(task: str, samples: list[dict]) -> list[dict]:
    rows = []
    for s in samples:
        row = {"task": task, "doc_id": s["doc_id"]}
        if task == "holdout_perplexity":
            text = s["doc"]["text"]
            row |= {"loglikelihood": float(s["filtered_resps"][0]), "words": len(re.split(r"\s+", text)),
                    "bytes": len(text.encode())}
        else:
            for metric in ("acc", "exact_match", "acc_norm"):
                if metric in s:
                    row["score"] = float(s[metric])
                    row["metric"] = metric
                    break
        rows.append(row)
    return rows


def measure_accuracy(*, profile_dir: str, profile_fp: str, backend_name: str, spec: EvaluationSpec,
                     holdout_file: str) -> AccuracyResult:
    """Run the evaluation tasks on one built profile; cached by profile content, eval spec, data and harness."""
    inputs = task_inputs(spec.tasks, holdout_file, spec.limit)
    key = cache_key(profile_fp=profile_fp, spec=spec, inputs=inputs)
    out = store.stage_dir("accuracy", key)
    manifest, cached = store.reuse_or_make(out, lambda out: _run(profile_dir, backend_name, spec, inputs, key, out))
    return AccuracyResult(str(out), manifest["metrics"], str(out / "items.parquet"), manifest["n_items"],
                          manifest["seconds"], cached)


def _write_lm_eval_results(results: dict, path: Path, *, written_in: Path | None = None,
                           final: Path | None = None) -> None:
    """lm-eval's own results JSON (results with stderr, task configs, versions, n-samples, its run config), as its
    CLI writes it, minus the per-item samples (kept in items.parquet). Paths into the temporary directory it was
    written in (`written_in`, e.g. each task config's data file) are rewritten to where the output ends up
    (`final`): the temporary directory is gone once the output is in place."""
    from lm_eval.utils import handle_non_serializable

    text = json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2,
                      default=handle_non_serializable, ensure_ascii=False)
    if written_in is not None and final is not None:
        text = text.replace(str(Path(written_in).resolve()), str(Path(final).resolve()))
    path.write_text(text)


def _run(profile_dir, backend_name, spec, inputs, key, out) -> dict:
    import time

    import lm_eval
    from lm_eval.tasks import TaskManager

    from tasks.backends import get as backend
    from tasks.profiles.profile import verify_artifact

    verify_artifact(profile_dir)
    started = time.perf_counter()
    with store.atomic_dir(out) as tmp:
        configs = task_configs(inputs, tmp)
        hub_tasks = [c for c in configs if isinstance(c, str)]
        manager = TaskManager(include_defaults=bool(hub_tasks))
        with backend(backend_name).lm_eval_model(Path(profile_dir), batch_size=spec.batch_size,
                                                 max_length=spec.max_length) as lm:
            results = lm_eval.simple_evaluate(model=lm, tasks=configs, task_manager=manager,
                                              limit=spec.limit if hub_tasks else None, log_samples=True,
                                              bootstrap_iters=STDERR_BOOTSTRAP)
        rows = [r for task in results["samples"] for r in per_item_rows(task, results["samples"][task])]
        pd.DataFrame(rows).to_parquet(tmp / "items.parquet", index=False)
        _write_lm_eval_results(results, tmp / LM_EVAL_RESULTS, written_in=tmp, final=out)
        metrics = {task: {k.split(",")[0]: v for k, v in vals.items()
                          if isinstance(v, (int, float)) and not k.startswith("sample_len") and "_stderr" not in k}
                   for task, vals in results["results"].items()}
        seconds = round(time.perf_counter() - started, 2)
        return store.write_manifest(tmp, {
            "stage": "accuracy", "key": key, "metrics": metrics, "seconds": seconds,
            "n_items": {t: n["effective"] for t, n in results["n-samples"].items()},
            "harness": {"lm_eval": machine.version_of("lm_eval"), "task_versions": results.get("versions", {})},
        })
