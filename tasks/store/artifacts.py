"""Content-addressed artifacts: manifests, atomic writes, verification, locks, reuse, and the shared-store hook.

Every stage writes to ``<home>/<stage>/<key>/`` where the key hashes everything its output depends on. A directory
appears only complete: it is written under a temporary name, ``manifest.json`` last, then renamed into place. The
manifest records every file's size and SHA-256 (computed once, when written); reuse checks them (a damaged entry is
rebuilt, never reused) and loading a profile or a registry download checks the digests.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable, Iterator

from tasks.base.errors import Refused
from tasks.store.digests import carry_over, digest_files
from tasks.store.keys import key_of
from tasks.store.paths import MANIFEST, NOT_STORE, home

log = logging.getLogger(__name__)


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete artifact, or None when there is none (never written, or half-written)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def temporary_sibling(final: Path) -> Path:
    """A fresh temporary name next to ``final``, naming this host and process (see :func:`sweep_temporaries`)."""
    return final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to ``final``; on error it is removed.

    The caller writes ``manifest.json`` last (see :func:`write_manifest`). If another writer finished the same
    key first, its copy is kept: content-addressed outputs are interchangeable. A writer killed before the rename
    leaves its temporary directory; :func:`sweep_temporaries` removes those of dead processes.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError(f"internal error: {final} was not given a manifest")
        if final.exists():
            if read_manifest(final) is not None and not verify(final):
                shutil.rmtree(tmp)
                return
            shutil.rmtree(final)  # a leftover without a (valid) manifest is not an artifact
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sweep_temporaries(root: Path | None = None) -> list[Path]:
    """Remove temporary directories that writers on this host left when they were killed (their pid is gone)."""
    root = Path(root or home())
    host = socket.gethostname()
    removed = []
    for tmp in root.rglob(".*.tmp-*"):
        try:
            owner_host, pid = tmp.name.rsplit(".tmp-", 1)[1].rsplit("-", 2)[:2]
            pid = int(pid)
        except ValueError:
            continue
        if owner_host != host or _alive(pid) or not tmp.is_dir():
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    if removed:
        log.warning("removed %d temporary director%s left by interrupted writes: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", ", ".join(str(p) for p in removed[:5]))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_manifest(directory: Path, manifest: dict, *, files: dict[str, dict] | None = None,
                   volatile: tuple[str, ...] = ()) -> dict:
    """Record every file's size and SHA-256, derive the fingerprint, and write the manifest (the last file written).

    Args:
        files: digests already known for some files (written through :class:`HashingWriter`, or hard-linked from
            another artifact whose manifest has them); every other file is hashed once here, right after the code
            that wrote it (in parallel threads), and never again on reuse.
        volatile: files whose bytes differ between two runs of the same inputs (e.g. a pickled state with object
            ids); they are verified like the others but left out of the fingerprint, so equal inputs dedupe.

    The fingerprint (``content_hash``) hashes the manifest's ``key`` with the digests of the deterministic files.
    """
    directory = Path(directory)
    known = dict(files or {})
    paths = [p for p in sorted(directory.rglob("*")) if p.is_file()]
    rels = {p: p.relative_to(directory).as_posix() for p in paths}
    todo = [p for p in paths if rels[p] not in known and rels[p] not in (MANIFEST, MANIFEST + ".tmp")]
    known |= {rels[p]: meta for p, meta in digest_files(todo).items()}
    records = {rel: known[rel] for rel in sorted(known) if (directory / rel).is_file()}
    manifest = {**manifest, "files": records, "volatile": list(volatile)}
    manifest["content_hash"] = fingerprint_of(manifest)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, directory / MANIFEST)
    return manifest


def fingerprint_of(manifest: dict) -> str:
    """The fingerprint a manifest's own records imply: its ``key`` hashed with the digests of its deterministic files
    (what :func:`write_manifest` stores as ``content_hash``). A manifest whose digests were edited but whose
    ``content_hash`` was not no longer hashes to it."""
    volatile = set(manifest.get("volatile") or ())
    stable = {rel: meta["sha256"] for rel, meta in (manifest.get("files") or {}).items() if rel not in volatile}
    return key_of(manifest.get("key"), stable)


def verify(directory: Path, *, full: bool = False, sizes_only: bool = False) -> list[str]:
    """What is wrong with an artifact, one line per file (empty when it is intact).

    Sizes are always checked. By default a file's digest is recomputed only when its identity (inode, size, mtime,
    ctime) changed since it was hashed: any write through the kernel changes ctime, even one whose size and mtime
    were set back (tasks/store/digests.py says why that suffices and what it misses: bit rot without a write);
    ``full`` recomputes every digest; ``sizes_only`` checks presence and sizes alone.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return [f"{directory}: no {MANIFEST}; not a complete artifact"]
    records = manifest.get("files")
    if records is None:
        return [f"{directory}: {MANIFEST} records no file digests (written by an older enginewright); rebuild it"]
    problems, present = [], []
    for rel, meta in records.items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel}: missing (manifest records {meta['size']} bytes)")
        elif (size := path.stat().st_size) != meta["size"]:
            problems.append(f"{rel}: {size} bytes, manifest records {meta['size']}")
        else:
            present.append(path)
    if not sizes_only and present:
        digests = digest_files(present, trust_cache=not full)
        for path in present:
            rel = path.relative_to(directory).as_posix()
            if (actual := digests[path]["sha256"]) != records[rel]["sha256"]:
                problems.append(f"{rel}: sha256 {actual[:16]}…, manifest records {records[rel]['sha256'][:16]}…")
    return problems


def entries(root: Path | None = None) -> list[Path]:
    """Every stage output of the store (a directory holding a manifest), sorted; temporaries of unfinished writes,
    and what lives under the home but is not the store (:data:`~tasks.store.paths.NOT_STORE`), are left out."""
    root = Path(root or home())
    found = []
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        if here != root and MANIFEST in files:
            found.append(here)
            subdirs[:] = []  # an entry's own files, not entries
            continue
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and not (here == root and d in NOT_STORE))
    return sorted(found)


def verify_store(root: Path | None = None) -> dict[Path, list[str]]:
    """Every entry of the store hashed again in full (no remembered digest trusted): ``{entry: problems}`` for each
    entry, an empty list when it is intact. What reuse cannot see (bytes changed without a write: bit rot) this
    finds."""
    return {entry: verify(entry, full=True) for entry in entries(root)}


class ArtifactDamaged(Refused):
    """An artifact's files do not match its manifest."""


def check(directory: Path, *, full: bool = False, sizes_only: bool = False) -> dict:
    """The manifest of an intact artifact; raises :class:`ArtifactDamaged` naming each file that differs."""
    problems = verify(directory, full=full, sizes_only=sizes_only)
    if problems:
        raise ArtifactDamaged(f"{directory} does not match its manifest:\n  " + "\n  ".join(problems))
    return read_manifest(directory)


# --- reuse, locking and the shared artifact store -----------------------------------------------------------------

class Remote:
    """Where stage outputs travel between hosts (set by the flow layer: MLflow's artifact store). Each host's
    local store is a cache of it, addressed by the same relative path (``<stage>/<key>``)."""

    def fetch(self, rel: str, dest: Path) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def publish(self, rel: str, src: Path) -> None:  # pragma: no cover - interface
        raise NotImplementedError


_remote: Remote | None = None


def set_remote(remote: Remote | None) -> None:
    global _remote
    _remote = remote


def reuse(out: Path) -> dict | None:
    """The manifest of a complete, intact artifact at ``out``; a damaged one is removed, with a warning naming what
    differs, so it is rebuilt — never reused."""
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        return None
    problems = verify(out)
    if not problems:
        return manifest
    log.warning("cached %s is damaged, rebuilding it: %s", out, "; ".join(problems))
    shutil.rmtree(out, ignore_errors=True)
    return None


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """An exclusive lock on one key, across threads and processes of this host (a second builder waits)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def claim(out: Path) -> Iterator[dict | None]:
    """Hold the key's lock and yield the manifest of an intact artifact for it — found here or fetched from the
    shared artifact store — or None, for the caller to build it with :func:`atomic_dir`. A new build is published
    to the shared store when one is set."""
    out = Path(out)
    with lock(out):
        manifest = reuse(out)
        rel = out.relative_to(home()).as_posix() if out.is_relative_to(home()) else None
        if manifest is None and _remote is not None and rel is not None and _remote.fetch(rel, out):
            manifest = read_manifest(out)
        yield manifest
        if manifest is None and _remote is not None and rel is not None and read_manifest(out) is not None:
            _remote.publish(rel, out)


def reuse_or_make(out: Path, make: Callable[[Path], dict]) -> tuple[dict, bool]:
    """(manifest, cached) of the stage output `out`: an intact one reused or fetched under :func:`claim`, else
    `make(out)`'s (which writes it with :func:`atomic_dir` and returns its manifest)."""
    with claim(out) as manifest:
        if manifest is not None:
            return manifest, True
        return make(out), False


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file when on the same filesystem (artifacts are immutable), else copy it. A link changes the
    file's ctime; the digest remembered for it is carried over, so the linked file is not read again."""
    before = os.stat(src)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        return
    carry_over(before, os.stat(dst))


def link_or_copy_tree(src: Path, dst: Path, known: dict[str, dict] | None = None) -> dict[str, dict]:
    """Hard-link files when on the same filesystem (artifacts are immutable), else copy.

    Returns the digests of the new files, relative to ``dst``'s parent-artifact root as ``<dst name>/<rel>``, taken
    from ``known`` (the source artifact's manifest records, relative to ``src``) so nothing is hashed again.
    """
    records = {}
    for file in Path(src).rglob("*"):
        if file.is_dir():
            continue
        rel = file.relative_to(src).as_posix()
        target = Path(dst) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(file, target)
        if known and rel in known:
            records[f"{Path(dst).name}/{rel}"] = known[rel]
    return records


def manifest_records_under(artifact: Path, subdir: Path) -> dict[str, dict]:
    """The manifest's file records of ``artifact`` that lie under ``subdir``, relative to ``subdir``."""
    manifest = read_manifest(artifact) or {}
    prefix = Path(subdir).relative_to(artifact).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    return {rel[len(prefix):]: meta for rel, meta in manifest.get("files", {}).items() if rel.startswith(prefix)}


def artifact_root(path: Path) -> Path | None:
    """The store artifact a path lies in (the nearest directory upwards holding a manifest), if any."""
    for candidate in (Path(path), *Path(path).parents[:3]):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None
