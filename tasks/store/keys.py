"""Cache keys and fingerprints: a stable hash of parts, of a stage's source, of a directory's files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tasks.store.digests import digest_files, sha256_file
from tasks.store.paths import MANIFEST


def key_of(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def source_digest(*modules) -> str:
    """Hash of the given modules' source files: a stage's code is an input of its cache key."""
    return key_of([sha256_file(Path(m.__file__)) for m in modules])


def source_dir_digest(path: Path) -> str:
    """Fingerprint of a local directory (e.g. an HF checkpoint used in place); unchanged files are not re-read."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    digests = digest_files(files)
    return key_of({f.relative_to(path).as_posix(): digests[f]["sha256"] for f in files})


def fingerprint_dir(path: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> str:
    """Hash of every file's relative path and bytes (re-reads everything); for tests and ad-hoc checks."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel in exclude:
            continue
        h.update(rel.encode() + b"\0" + sha256_file(file).encode() + b"\n")
    return h.hexdigest()


def package_digest(path: Path) -> str:
    """Hash of a package directory's Python sources (its code as a cache-key input; caches such as __pycache__
    are not sources)."""
    files = sorted(p for p in Path(path).rglob("*.py") if "__pycache__" not in p.parts)
    return key_of({f.relative_to(path).as_posix(): sha256_file(f) for f in files})
