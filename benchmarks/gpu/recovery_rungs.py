"""Recovery rungs on one CUDA machine: INT4-AWQ PTQ, then ModelOpt AutoQuantize and quantization-aware distillation,
each built, evaluated and gated like the pipeline does, with stage times, estimates and peak GPU memory.

No network is needed: the model is a Llama made here (random init, then trained briefly on pydoc text so INT4 costs
measurable perplexity), the tokenizer a BPE trained on the same text. Uses the stage functions the flow calls
(flows/target.py's recovery_rungs included); Prefect and MLflow are not needed. Writes a JSON record.

    python benchmarks/gpu/recovery_rungs.py --out recovery.json                  # ~1B-parameter shape, H100/H200
    python benchmarks/gpu/recovery_rungs.py --hidden 64 --layers 2 --vocab 512 --train-steps 50 \
        --qat-steps 4 --limit 40 --out smoke.json                                   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_model(out: Path, *, hidden: int, layers: int, vocab: int, train_steps: int, seq: int = 256) -> dict:
    """A Llama of the given shape with a BPE tokenizer trained on pydoc text, trained `train_steps` steps on it."""
    from pydoc_data.topics import topics

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = list(topics.values())
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab,
                                                      special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 63) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    ids = torch.tensor(tok("\n\n".join(text))["input_ids"])
    ids = ids[: len(ids) // seq * seq].view(-1, seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    started, losses = time.perf_counter(), []
    for step in range(train_steps):
        batch = ids[torch.randint(0, len(ids), (16,))].to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    head = model.lm_head.weight.numel()
    return {"params": sum(p.numel() for p in model.parameters()), "linear_params": linear, "lm_head_params": head,
            "train_steps": train_steps, "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
            "train_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="recovery-rungs.json")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--limit", type=int, default=300, help="held-out items per evaluation")
    # 0.5 %: on the default shape INT4-AWQ costs ~0.2 % (95 % bound ~0.6 %, H200), and 300 items resolve +-0.38 %
    ap.add_argument("--tolerance", type=float, default=0.005, help="perplexity gate: max relative increase")
    args = ap.parse_args()
    # the stages' estimates ("~N s estimated") and progress lines go to the log next to the record
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    from flows.stages import RunRecord
    from flows.target import recovery_rungs
    from recipes.schema import Recipe
    from tasks import store
    from tasks.calibration import calibrate
    from tasks.decisions import gates
    from tasks.host import machine
    from tasks.models import import_model
    from tasks.profiles import build
    from tasks.quantization import quantize
    from tasks.validation import accuracy

    home = store.home()
    model_dir = home / "recovery-model"
    shape = make_model(model_dir, hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                       train_steps=args.train_steps)
    # the budget halfway between all-INT4 and all-FP8, counting the 16-bit lm_head as AutoQuantize does
    lo = ((4 * shape["linear_params"] + 16 * shape["lm_head_params"])
          / (shape["linear_params"] + shape["lm_head_params"]))
    hi = ((8 * shape["linear_params"] + 16 * shape["lm_head_params"])
          / (shape["linear_params"] + shape["lm_head_params"]))
    budget = round((lo + hi) / 2, 2)
    recipe = Recipe.model_validate({
        "name": "recovery-rungs-gpu", "model": {"source": "hf_dir", "path": str(model_dir), "name": "recovery-llama"},
        "calibration": {"source": "pydoc_topics", "samples": 128, "max_tokens": 256, "holdout_fraction": 0.5},
        "quantization": {"formats": ["int4_awq"]}, "targets": [{"name": "gpu", "gpu": "auto", "backend": "reference"}],
        "evaluation": {"tasks": ["holdout_perplexity"], "limit": args.limit, "batch_size": 16, "max_length": 256},
        "gates": {"accuracy": {"tasks": {"holdout_perplexity": {"max_relative_increase": args.tolerance}}}},
        "recovery": {"auto_quantize": {"formats": ["int4_awq", "fp8"], "effective_bits": budget, "score_batches": 16},
                     "qat": {"steps": args.qat_steps, "lr": 1e-5, "seq_len": 256, "batch_size": 8, "samples": 1024}},
        "registry": {"name": "recovery"}})
    device = machine.local_device()
    target = recipe.targets[0]
    record: dict = {"device": device, "toolchain": machine.toolchain(), "model": shape, "budget": budget,
                    "budget_range": [round(lo, 3), round(hi, 3)], "stages": [], "rows": []}

    def timed(name, subject, fn, **kw):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        result = fn(**kw)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        record["stages"].append({"stage": name, "subject": subject, "seconds": round(time.perf_counter() - t, 2),
                                 "cached": getattr(result, "cached", False), "peak_gpu_gib": peak})
        print(f"{name:10s} {subject:24s} {record['stages'][-1]['seconds']:8.2f} s  peak {peak} GiB", flush=True)
        return result

    model = timed("import", "model", import_model.import_model, spec=recipe.model, base_dir=ROOT)
    calib = timed("calibrate", "pydoc", calibrate.calibrate, spec=recipe.calibration, model_dir=model.path,
                  base_dir=ROOT)
    ptq = timed("quantize", "int4_awq", quantize.quantize, model_dir=model.path, model_fp=model.fingerprint,
                calibration_file=calib.calibration_file, calib_digest=calib.digest, fmt="int4_awq",
                max_tokens=recipe.calibration.max_tokens, batch_size=recipe.calibration.batch_size)

    def evaluate_rung(fmt, checkpoint_dir, fingerprint, quant_algo):
        prof = timed("build", fmt, build.build, model_slug=model.name, checkpoint_dir=checkpoint_dir,
                     checkpoint_fp=fingerprint, fmt=fmt, quant_algo=quant_algo, target=target, device=device)
        return timed("accuracy", fmt, accuracy.measure_accuracy, profile_dir=prof.path, profile_fp=prof.fingerprint,
                     backend_name=prof.backend, spec=recipe.evaluation, holdout_file=calib.holdout_file)

    base = evaluate_rung("none", model.path, model.fingerprint, None)

    def gate_row(fmt, acc, extra=None):
        decision = gates.gate(baseline_items_file=base.items_file, candidate_items_file=acc.items_file,
                              baseline_latency={}, candidate_latency={}, gates=recipe.gates)
        [ppl] = [v for v in decision.verdicts if v.gate == "holdout_perplexity"]
        row = {"format": fmt, "status": decision.status, "perplexity_delta": ppl.value, "bound": ppl.bound,
               "tolerance": ppl.threshold, "reason": decision.reason, **(extra or {})}
        record["rows"].append(row)
        print(f"{fmt:16s} {decision.status:9s} Δppl {ppl.value:+.4f} (bound {ppl.bound:+.4f})", flush=True)
        return decision

    decision = gate_row("int4_awq", evaluate_rung("int4_awq", ptq.fakequant_dir, ptq.fingerprint, ptq.quant_algo))
    record["ptq_failed_accuracy"] = gates.accuracy_failed(decision)
    rungs_record = RunRecord()  # the flow's own ladder of recovery rungs (flows/target.py), timed as the flow does
    for name, make in recovery_rungs(recipe, ROOT, "int4_awq", ptq, target, device["arch"], model, calib,
                                     rungs_record):
        art = timed("recover", name, make)  # a crashed rung comes back as its reason; the next rung still runs
        if isinstance(art, str):
            record["rows"].append({"format": name, "status": "skipped", "reason": art})
            print(f"{name}: skipped: {art}", flush=True)
            continue
        manifest = store.read_manifest(Path(art.path))
        acc = evaluate_rung(name, art.fakequant_dir, art.fingerprint, art.quant_algo)
        gate_row(name, acc, {"seconds": art.seconds, "estimated_seconds": manifest.get("estimated_seconds"),
                             "weight_bits": art.weight_bits, "config": art.config,
                             "loss_first_last": [art.loss_curve[0], art.loss_curve[-1]] if art.loss_curve else None})
    Path(args.out).write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
