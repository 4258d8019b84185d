"""Reading request logs (the rules: tasks/calibration/request_log.py's docstring, **read**): JSON Lines streamed a line
at a time, OpenAI-style completion and chat records, chat rendered with the model's template as a server renders it."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.calibration.redaction import redact

MAX_LINE_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the sampler sees it. ``problem`` is set (and the rest empty) when the line is unusable."""
    line: int
    text: str = ""  # the rendered prompt: what the model is calibrated on (redacted when it is kept)
    content: str = ""  # the request's own text (prompt, or its non-system messages' text)
    system: str = ""  # its system prompt(s)
    fields: tuple[str, ...] = ()  # values of the metadata fields used for strata, in stratify_by order (redacted)
    problem: str | None = None  # malformed | unsupported | template_error | over_long | empty


def iter_lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, bytes)`` per line, lazily; ``None`` for a line over ``max_line_bytes`` (read past in chunks)."""
    with open(path, "rb") as f:
        number = 0
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            number += 1
            if len(line) > max_line_bytes:
                while line and not line.endswith(b"\n"):
                    line = f.readline(1 << 20)
                yield number, None
                continue
            yield number, line


def _message_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def _field_value(record: dict, name: str) -> str:
    value = record.get(name)
    if value is None and isinstance(record.get("metadata"), dict):
        value = record["metadata"].get(name)
    return "(none)" if value is None or value == "" else str(value)


@functools.lru_cache(maxsize=4096)
def _redacted_value(text: str) -> str:
    return redact(text)


class ChatTemplateMissing(ValueError):
    pass


def iter_requests(paths: Iterable[str | Path], tokenizer=None, *, fields: tuple[str, ...] = (),
                  redact_fields: bool = True, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Request]:
    """Every request of every log, in order, one at a time (a generator: nothing is read ahead).

    Chat requests are rendered with ``tokenizer``'s chat template; one without a template raises
    :class:`ChatTemplateMissing`. ``fields``: metadata values to carry (redacted unless ``redact_fields`` is off).
    """
    for path in paths:
        for number, raw in iter_lines(Path(path), max_line_bytes):
            if raw is None:
                yield Request(number, problem="over_long")
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                yield Request(number, problem="malformed")
                continue
            if not isinstance(record, dict):
                yield Request(number, problem="malformed")
                continue
            yield from _requests_of(record, number, tokenizer, fields, redact_fields)


def _requests_of(record: dict, number: int, tokenizer, fields: tuple[str, ...], redact_fields: bool):
    values = tuple(_redacted_value(_field_value(record, f)) if redact_fields else _field_value(record, f)
                   for f in fields)
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        clean, system, own = [], [], []
        for m in messages:
            if not isinstance(m, dict):
                yield Request(number, problem="malformed")
                return
            text = _message_text(m.get("content"))
            clean.append({**m, "content": text} if isinstance(m.get("content"), list) else m)  # parts -> text
            (system if m.get("role") in ("system", "developer") else own).append(text)
        content = "\n".join(own)
        if not content.strip():
            yield Request(number, problem="empty")
            return
        rendered = render_chat(tokenizer, clean, record.get("tools"))
        if rendered is None:
            yield Request(number, problem="template_error")
            return
        yield Request(number, rendered, content, "\n".join(system), values)
        return
    prompt = record.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else None
    if prompts is None or not all(isinstance(p, str) for p in prompts):  # token-id prompts are not supported
        yield Request(number, problem="unsupported")
        return
    for p in prompts:
        yield Request(number, p, p, "", values) if p.strip() else Request(number, problem="empty")


def render_chat(tokenizer, messages: list[dict], tools: list | None = None) -> str | None:
    """The prompt an OpenAI-compatible server builds from ``messages``; None when the template rejects them."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateMissing("calibration.source 'request_log': the log has chat requests (messages) but the "
                                  "model's tokenizer has no chat template to render them with")
    kwargs = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception:  # noqa: BLE001 - the template raises on what the server would reject (e.g. roles out of order)
        return None
