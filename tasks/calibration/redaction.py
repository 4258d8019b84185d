"""Redaction of secrets and personal data in the texts kept from request logs (the rules:
tasks/calibration/request_log.py's docstring, **redact**)."""

from __future__ import annotations

import re
from collections import Counter


def _luhn(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Every pattern starts with a literal or a character class, so the regex engine skips ahead fast; a pattern runs
# only when its cheap trigger (a substring of the text, or of its lower-cased copy) occurs.
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S)
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
_API_KEY = re.compile(r"(?<![A-Za-z0-9])(?:(?:sk|pk|rk)[-_](?:live_|test_|proj-|ant-)?[A-Za-z0-9_-]{16,}"
                      r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|xox[abposr]-[A-Za-z0-9-]{10,}"
                      r"|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_-]{20,})")
_API_KEY_TRIGGERS = ("k-", "k_", "hp_", "ho_", "hu_", "hs_", "hr_", "_pat_", "xox", "hf_", "glpat-")  # need - or _
_SECRET_TRIGGERS = ("pass", "pwd", "secret", "key", "token")  # in the lower-cased text
_SECRET_HINT = re.compile(r"(?:pass(?:word|wd)?|pwd|secret|key|token)[\"']?\s*[:=]")  # on the lower-cased text
_SECRET = re.compile(r"(?i)\b(password|passwd|pwd|secret|api[_-]?key|access[_-]?key|access[_-]?token|auth[_-]?token"
                     r"|client[_-]?secret|private[_-]?key)([\"']?\s*[:=]\s*[\"']?)(?!\[)[^\s\"',;]{4,}")
_EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])")
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_DIGITS3 = re.compile(r"[0-9]{3}")
_CARD = re.compile(r"[0-9]{4}([ -]?)[0-9]{4}\1[0-9]{4}\1[0-9]{4}(?![0-9])|[0-9]{4}([ -]?)[0-9]{6}\2[0-9]{5}(?![0-9])")
_SSN = re.compile(r"[0-9]{3}-[0-9]{2}-[0-9]{4}(?![0-9])")


def _sub(pattern: re.Pattern, text: str, replace, found: Counter, kind: str, left_boundary: bool = False) -> str:
    hits = 0

    def one(m: re.Match) -> str:
        nonlocal hits
        if left_boundary and m.start() and (text[m.start() - 1].isdigit() or text[m.start() - 1] == "-"):
            return m.group(0)
        out = replace(m)
        hits += out != m.group(0)
        return out

    text = pattern.sub(one, text)
    if hits:
        found[kind] += hits
    return text


def _redact_emails(text: str, found: Counter) -> str:
    parts, last, hits = [], 0, 0
    for m in _EMAIL_DOMAIN.finditer(text):
        start = m.start()
        while start > last and text[start - 1] in _EMAIL_LOCAL:
            start -= 1
        if start == m.start():
            continue
        parts += [text[last:start], "[EMAIL]"]
        last, hits = m.end(), hits + 1
    if not hits:
        return text
    found["email"] += hits
    return "".join(parts) + text[last:]


def redact(text: str, found: Counter | None = None) -> str:
    """Replace obvious secrets and personal data with ``[KIND]`` placeholders; ``found`` counts what was replaced."""
    found = Counter() if found is None else found
    if "PRIVATE KEY" in text:
        text = _sub(_PRIVATE_KEY, text, lambda m: "[PRIVATE_KEY]", found, "private_key")
    lowered = text.lower()
    if "bearer" in lowered:
        text = _sub(_BEARER, text, lambda m: "Bearer [TOKEN]", found, "bearer")
    if "eyJ" in text:
        text = _sub(_JWT, text, lambda m: "[TOKEN]", found, "jwt")
    if ((("-" in text or "_" in text) and any(t in text for t in _API_KEY_TRIGGERS))
            or "AKIA" in text or "AIza" in text):
        text = _sub(_API_KEY, text, lambda m: "[API_KEY]", found, "api_key")
    if any(t in lowered for t in _SECRET_TRIGGERS) and _SECRET_HINT.search(lowered):
        text = _sub(_SECRET, text, lambda m: f"{m.group(1)}{m.group(2)}[SECRET]", found, "secret")
    if "@" in text:
        text = _redact_emails(text, found)
    if _DIGITS3.search(text):
        text = _sub(_CARD, text, lambda m: "[CARD]" if _luhn(m.group(0)) else m.group(0), found, "card", True)
        if "-" in text:
            text = _sub(_SSN, text, lambda m: "[SSN]", found, "ssn", True)
    return text
