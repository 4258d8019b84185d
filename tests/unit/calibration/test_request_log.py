"""Production request logs: reading, chat rendering, redaction, deduplication, stratified sampling, bounded memory."""

import inspect
import json
import random
import tracemalloc

import pandas as pd
import pytest

from recipes.schema import CalibrationSpec
from tasks.calibration import calibrate, duplicates, redaction, request_log, request_reader
from tasks.calibration.request_log import Sampler, SamplingOptions
from tasks.calibration.request_reader import Request


def words(texts):
    """A fast, exact token counter for sampler-level tests: whitespace words."""
    return [len(t.split()) for t in texts]


def vocabulary():
    from pydoc_data.topics import topics

    return sorted({w for t in topics.values() for w in t.split() if w.isalpha() and w.islower() and len(w) > 2})


def prose(rng, n_words, vocab):
    return " ".join(rng.choice(vocab) for _ in range(n_words))


def write_log(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path



def spec(path, **kw):
    return CalibrationSpec(**({"source": "request_log", "paths": [str(path)], "max_tokens": 64} | kw))


# ------------------------------------------------------------------------------------------------------ schema

def test_request_log_defaults_and_checks():
    s = CalibrationSpec(source="request_log", paths=["log.jsonl"])
    assert s.samples == 512 and s.min_chars == 0  # this source's defaults
    assert CalibrationSpec(source="request_log", paths=["x.jsonl"], samples=32).samples == 32
    assert CalibrationSpec(source="pydoc_topics").samples == 64
    with pytest.raises(ValueError, match="calibration.request_log applies only"):
        CalibrationSpec(source="pydoc_topics", request_log={"redact": False})
    with pytest.raises(ValueError, match="calibration.paths"):
        CalibrationSpec(source="request_log")
    with pytest.raises(ValueError, match="strictly increasing"):
        CalibrationSpec(source="request_log", paths=["x"], request_log={"length_buckets": [64, 32]})
    opts = SamplingOptions.from_spec(CalibrationSpec(source="request_log", paths=["x"],
                                                     request_log={"stratify_by": "tenant"}))
    assert opts.stratify_by == ("tenant",) and opts.metadata_fields == ("tenant",)


# ------------------------------------------------------------------------------------------------------ (2) chat

def test_chat_requests_are_rendered_with_the_chat_template(chat_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "What is a generator?"},
                                             {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    log = write_log(tmp_path / "chat.jsonl", [
        {"messages": messages, "tenant": "acme"},
        {"prompt": "def fib(n):", "metadata": {"tenant": "globex"}},
        "not json", {"input": "no prompt"}, {"messages": [{"role": "user", "content": "  "}]},
    ])
    reqs = list(request_reader.iter_requests([log], tok, fields=("tenant",)))
    as_server = tok.apply_chat_template([messages[0], {"role": "user", "content": "What is a generator?"}],
                                        tokenize=False, add_generation_prompt=True)
    assert reqs[0].text == as_server
    assert reqs[0].text.startswith("<|im_start|>system\nYou answer briefly.<|im_end|>")
    assert reqs[0].text.endswith("<|im_start|>assistant\n")
    assert reqs[0].content == "What is a generator?" and reqs[0].system == "You answer briefly."
    assert reqs[0].fields == ("acme",)
    assert reqs[1].text == "def fib(n):" and reqs[1].fields == ("globex",)  # completions: the prompt as is
    assert [r.problem for r in reqs[2:]] == ["malformed", "unsupported", "empty"]


def test_calibration_set_holds_rendered_chat_prompts(chat_model_dir, tmp_path):
    rng, vocab = random.Random(1), vocabulary()
    log = write_log(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": prose(rng, rng.randint(5, 30), vocab)}]} for _ in range(300)])
    art = calibrate.calibrate(spec(log, samples=40), model_dir=str(chat_model_dir), base_dir=tmp_path)
    df = pd.read_parquet(art.calibration_file)
    assert len(df) == 40 and all(t.startswith("<|im_start|>user\n") and t.endswith("<|im_start|>assistant\n")
                                 for t in df["text"])
    assert set(df.columns) >= {"text", "n_tokens", "stratum", "occurrences"}


def test_chat_log_without_a_chat_template_is_refused(tiny_model_dir, tmp_path):
    log = write_log(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hello there"}]}] * 3)
    with pytest.raises(ValueError, match="no chat template"):
        calibrate.calibrate(spec(log, samples=1), model_dir=str(tiny_model_dir), base_dir=tmp_path)


# ------------------------------------------------------------------------------------------------------ (3) near dups

def test_near_duplicate_rule():
    index = duplicates.NearDuplicateIndex(0.8)
    base = "Ticket 1234: the printer on floor 3 prints blank pages after the last driver update, please advise"
    assert not index.seen(base)
    assert index.seen(base.replace("1234", "98765").replace("floor 3", "floor 12"))  # digits masked
    assert index.seen(base.upper() + "   ")  # case and whitespace
    assert not index.seen("A completely different question about generators and iterators in Python")
    long_system = " ".join(["You are the helpful support assistant of Globex; be concise and polite."] * 20)
    assert not index.seen("where is my order", long_system)
    assert not index.seen("how do I reset my password", long_system)  # a shared system prompt is not a duplicate
    assert not index.seen(base, "another system prompt")  # same text, different system prompt
    assert (index.examined, index.removed) == (7, 2)
    assert not duplicates.NearDuplicateIndex(None).seen(base)  # threshold off: exact duplicates only


def test_near_duplicates_are_removed_with_counts(tmp_path):
    rng, vocab = random.Random(2), vocabulary()
    clusters = [prose(rng, 30, vocab) for _ in range(60)]
    records = []
    for i, base in enumerate(clusters):  # each cluster: 6 variants differing in an id and one word
        for v in range(6):
            w = base.split()
            w[rng.randrange(len(w))] = rng.choice(vocab) if v else w[0]
            records.append({"prompt": f"order {1000 * i + v}: " + " ".join(w)})
    records += [{"prompt": prose(rng, 30, vocab)} for _ in range(200)]
    records += records[-20:]  # exact duplicates
    rng.shuffle(records)
    reqs = list(request_reader.iter_requests([write_log(tmp_path / "l.jsonl", records)]))
    result = Sampler(SamplingOptions(samples=150, holdout_fraction=0.1, stratify_by=()), words).consume(reqs).finish()
    c = result.counts
    assert c["near_duplicates_removed"] > 0
    assert c["near_duplicates_removed"] == c["candidates_examined"] - len(result.texts)
    assert c["exact_duplicates_in_candidates"] > 0
    assert len(result.texts) == 150 and len(set(result.texts)) == 150
    sh = [duplicates.shingles(t) for t in result.texts]
    assert all(duplicates.jaccard(a, b) < 0.8 for i, a in enumerate(sh) for b in sh[i + 1:])
    exact = Sampler(SamplingOptions(samples=150, holdout_fraction=0.1, stratify_by=(), near_duplicate_threshold=None),
                    words).consume(reqs).finish()
    assert exact.counts["near_duplicates_removed"] == 0


# ------------------------------------------------------------------------------------------------------ (4) redaction

def test_redaction_patterns():
    text = ("mail john.smith+x@mail.example.co.uk; Authorization: Bearer abcdefghij0123456789; key sk-proj-"
            "ABCDEFGHIJKLMNOPQRSTUV; password: hunter22; card 4111 1111 1111 1111; ssn 123-45-6789; "
            "token ghp_abcdefghijklmnopqrstuvwxyz0123456789; AKIAABCDEFGHIJKLMNOP")
    found = request_log.Counter()
    out = redaction.redact(text, found)
    for secret in ("john.smith", "abcdefghij0123456789", "ABCDEFGHIJKLMNOPQRSTUV", "hunter22", "4111 1111",
                   "123-45-6789", "ghp_abc", "AKIAABCD"):
        assert secret not in out
    assert set(found) == {"email", "bearer", "api_key", "secret", "card", "ssn"}
    harmless = "Use @decorator on line 12, version 1.2.3 released 2024-01-01; order 4111111111111112."
    assert redaction.redact(harmless) == harmless  # no e-mail, not a Luhn-valid card


def test_secrets_are_redacted_before_anything_is_stored(tiny_model_dir, tmp_path):
    rng, vocab = random.Random(3), vocabulary()
    records = []
    for i in range(400):
        text = prose(rng, rng.randint(8, 20), vocab)
        if i % 3 == 0:
            text += f" contact user{i}@corp.example.com with api_key=sk-live_{i:06d}abcdefghijklmnop"
        records.append({"prompt": text, "tenant": f"ops{i % 2}@corp.example.com"})
    log = write_log(tmp_path / "pii.jsonl", records)
    art = calibrate.calibrate(spec(log, samples=60, request_log={"stratify_by": ["length", "tenant"]}),
                              model_dir=str(tiny_model_dir), base_dir=tmp_path)
    stored = b"".join(p.read_bytes() for p in (tmp_path / "ewhome").rglob("*") if p.is_file())
    assert b"corp.example.com" not in stored and b"abcdefghijklmnop" not in stored
    texts = pd.read_parquet(art.calibration_file)["text"].tolist() + pd.read_parquet(art.holdout_file)["text"].tolist()
    assert any("[EMAIL]" in t and "[API_KEY]" in t for t in texts)
    assert art.stats["redacted"] > 0
    assert set(pd.read_parquet(art.calibration_file)["stratum"].str.split("|").str[1]) == {"tenant=[EMAIL]"}
    off = calibrate.calibrate(spec(log, samples=60, request_log={"redact": False}), model_dir=str(tiny_model_dir),
                              base_dir=tmp_path)
    assert any("corp.example.com" in t for t in pd.read_parquet(off.calibration_file)["text"])


# ------------------------------------------------------------------------------------------------------ sampling

def test_sample_is_seeded_order_independent_and_never_held_out(tmp_path):
    rng, vocab = random.Random(4), vocabulary()
    records = [{"prompt": prose(rng, rng.randint(3, 60), vocab), "tenant": rng.choice("abc")} for _ in range(3000)]
    opts = SamplingOptions(samples=100, seed=7, stratify_by=("tenant", "length"), length_buckets=(8, 16, 32),
                           token_lengths="exact")
    first = Sampler(opts, words).consume(request_reader.iter_requests([write_log(tmp_path / "a.jsonl", records)],
                                                                   fields=("tenant",))).finish()
    rng.shuffle(records)
    shuffled = Sampler(opts, words).consume(request_reader.iter_requests([write_log(tmp_path / "b.jsonl", records)],
                                                                      fields=("tenant",))).finish()
    assert set(first.texts) == set(shuffled.texts) and set(first.holdout) == set(shuffled.holdout)
    other_seed = Sampler(SamplingOptions(**{**opts.__dict__, "seed": 8}), words).consume(
        request_reader.iter_requests([tmp_path / "a.jsonl"], fields=("tenant",))).finish()
    assert set(other_seed.texts) != set(first.texts)
    # held-out texts are exactly those calibrate.is_holdout picks, and calibration never sees one
    assert not any(calibrate.is_holdout(duplicates.dedupe_key(t), 7, 0.2) for t in first.texts)
    assert all(calibrate.is_holdout(duplicates.dedupe_key(t), 7, 0.2) for t in first.holdout)
    # each stratum keeps its share of the source, within rounding
    total = sum(first.source_strata.values())
    for stratum, count in first.source_strata.items():
        assert abs(first.strata.count(stratum) / 100 - count / total) <= 1 / 100 + 1e-9


def test_allocation_gives_a_short_stratum_remainder_to_the_others():
    assert request_log.allocate({"a": 90, "b": 10}, 10, {"a": 20, "b": 20}) == {"a": 9, "b": 1}
    assert request_log.allocate({"a": 50, "b": 50}, 10, {"a": 20, "b": 2}) == {"a": 8, "b": 2}
    assert request_log.allocate({"a": 1, "b": 1, "c": 1}, 10, {"a": 1, "b": 1, "c": 1}) == {"a": 1, "b": 1, "c": 1}
    assert sum(request_log.allocate({"a": 3, "b": 3, "c": 3}, 10, {"a": 9, "b": 9, "c": 9}).values()) == 10


def test_drops_are_counted(tmp_path):
    records = ([{"prompt": "word " * 5}] * 1 + [{"prompt": "long " * 500}] * 3 + ["{broken"] * 2
               + [{"prompt": [1, 2, 3]}] + [{"prompt": ""}] + [{"prompt": f"fine text number {i}"} for i in range(30)])
    log = write_log(tmp_path / "d.jsonl", records)
    log.write_text(log.read_text() + "x" * 5000 + "\n")  # a line over the line limit
    reqs = request_reader.iter_requests([log], max_line_bytes=4096)
    result = Sampler(SamplingOptions(samples=10, max_record_tokens=100, stratify_by=()), words).consume(reqs).finish()
    c = result.counts
    assert (c["over_long"], c["malformed"], c["unsupported"], c["empty"]) == (4, 2, 1, 1)
    assert c["records"] == 39 and c["usable"] == 31


def test_too_few_requests_names_the_field(tiny_model_dir, tmp_path):
    log = write_log(tmp_path / "few.jsonl", [{"prompt": f"only a handful of prompts, number {i}"} for i in range(5)])
    with pytest.raises(ValueError, match="calibration.samples"):
        calibrate.calibrate(spec(log, samples=50), model_dir=str(tiny_model_dir), base_dir=tmp_path)


def test_calibrate_request_log_is_cached_and_digest_covers_the_texts(tiny_model_dir, tmp_path):
    rng, vocab = random.Random(5), vocabulary()
    log = write_log(tmp_path / "c.jsonl", [{"prompt": prose(rng, rng.randint(5, 40), vocab)} for _ in range(500)])
    s = spec(log, samples=50)
    first = calibrate.calibrate(s, model_dir=str(tiny_model_dir), base_dir=tmp_path)
    texts = pd.read_parquet(first.calibration_file)["text"].tolist()
    assert first.digest == calibrate.store.key_of(texts, s.max_tokens)
    again = calibrate.calibrate(s.model_copy(update={"representativeness": s.representativeness.model_copy(
        update={"max_ks": 0.3})}), model_dir=str(tiny_model_dir), base_dir=tmp_path)
    assert again.cached and again.digest == first.digest  # thresholds do not change the set
    other = calibrate.calibrate(spec(log, samples=50, seed=99), model_dir=str(tiny_model_dir), base_dir=tmp_path)
    assert not other.cached and other.digest != first.digest


# ------------------------------------------------------------------------------------------------------ (6) streaming

def _prompt_log(path, n, seed=6):
    """n prompts of 20-400 words (windows of CPython's pydoc prose), tenant metadata."""
    from pydoc_data.topics import topics

    corpus = " ".join(" ".join(topics.values()).split())
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            start = rng.randrange(len(corpus) - 3000)
            f.write(json.dumps({"prompt": corpus[start:start + rng.randint(100, 2500)], "tenant": f"t{i % 3}"}) + "\n")
    return path


def _peak_while_sampling(path, opts):
    tracemalloc.start()
    try:
        sampler = Sampler(opts, words)
        most = 0
        for i, request in enumerate(request_reader.iter_requests([path], fields=("tenant",))):
            sampler.add(request)
            if i % 500 == 0:
                most = max(most, sampler.held())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, most, sampler


def test_reading_is_streaming_and_memory_is_bounded(tmp_path):
    small, large = _prompt_log(tmp_path / "small.jsonl", 10_000), _prompt_log(tmp_path / "large.jsonl", 40_000)
    reqs = request_reader.iter_requests([large])
    assert inspect.isgenerator(reqs) and isinstance(next(reqs), Request)  # nothing read ahead
    opts = SamplingOptions(samples=32, reference_samples=200, holdout_samples=32, stratify_by=("tenant", "length"),
                           length_buckets=(16, 64, 256))
    peak_small, held_small, _ = _peak_while_sampling(small, opts)
    peak_large, held_large, sampler = _peak_while_sampling(large, opts)
    assert sampler.counts["records"] == 40_000
    # what the sampler holds does not grow with the log: reservoirs, the reference sample and at most one batch
    strata = len(sampler.source_strata)
    assert held_small <= sampler.max_held() and held_large <= sampler.max_held()
    assert held_large <= strata * 2 * 32 + 32 + 200 + 32 + request_log.WARMUP_RECORDS
    # 4x the records, about the same memory (the distinct-count sketch fills up to its fixed size: ~3 MB)
    assert peak_large < 1.3 * peak_small + 3_000_000, (peak_small, peak_large)
    assert peak_large < large.stat().st_size / 3, (peak_large, large.stat().st_size)  # never the whole log
