"""File digests, computed once: streamed while writing (:class:`HashingWriter`), or hashed right after a library
wrote a file, and remembered by the file's identity (device, inode, size, mtime, ctime) in ``<home>/digests.sqlite``
so an unchanged file — a 15 GB source checkpoint, a hard-linked copy — is never read again to be hashed.

Why the identity includes the inode's change time (ctime), and why that is enough to trust a remembered digest:
every way user space changes a file's bytes (write, truncate, mmap, copy over it, rename another file onto it) sets
its ctime to now, and so does setting its mtime back (``touch -r``, ``os.utime``): there is no call that sets ctime.
So a flipped byte that keeps size and mtime still changes the identity and the file is hashed again on its next use,
at no cost for an unchanged file (one ``stat``). What it cannot see: bytes that change without a write through the
kernel (bit rot on the disk, a bad controller, someone editing the block device), or root setting the system clock
back around an edit. Those are found by hashing everything again, ``enginewright verify-store``. (A hard link or a
chmod also sets ctime: :func:`carry_over` keeps a remembered digest across the store's own hard links.)"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.store.paths import home


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- digests: computed once, remembered by the file's identity -----------------------------------------------------

def stat_key(st: os.stat_result) -> tuple:
    """A file's identity for the digest cache: (device, inode, size, mtime, ctime), see the module's docstring."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _digest_db() -> sqlite3.Connection:
    path = home() / "digests.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=60, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    # `file_digests` replaces `digests` (keyed without ctime): its rows cannot be trusted, so every file is hashed
    # once more after the upgrade.
    con.execute("DROP TABLE IF EXISTS digests")
    con.execute("CREATE TABLE IF NOT EXISTS file_digests (dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER, "
                "ctime_ns INTEGER, sha256 TEXT, PRIMARY KEY (dev, ino))")
    return con


def remember(entries: list[tuple[tuple, str]]) -> None:
    if not entries:
        return
    with contextlib.closing(_digest_db()) as con:
        con.executemany("INSERT OR REPLACE INTO file_digests VALUES (?, ?, ?, ?, ?, ?)",
                        [(*k, d) for k, d in entries])


def carry_over(before: os.stat_result, after: os.stat_result) -> None:
    """Keep a remembered digest across a change of ctime alone (the store hard-linking a file it already hashed):
    only the digest remembered for the file's identity ``before`` is moved to ``after``, never a digest taken from a
    manifest, so a file changed before the link is still hashed again."""
    if (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns) != \
            (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns):
        return
    if known := _recalled([stat_key(before)]).get(stat_key(before)):
        remember([(stat_key(after), known)])


def _recalled(keys: list[tuple]) -> dict[tuple, str]:
    if not keys:
        return {}
    with contextlib.closing(_digest_db()) as con:
        found = {}
        for key in keys:
            row = con.execute("SELECT sha256 FROM file_digests WHERE dev=? AND ino=? AND size=? AND mtime_ns=? "
                              "AND ctime_ns=?", key).fetchone()
            if row:
                found[key] = row[0]
        return found


def digest_files(paths: list[Path], *, trust_cache: bool = True) -> dict[Path, dict]:
    """``{path: {"size", "sha256"}}``. A file whose identity (device, inode, size, mtime, ctime) was hashed before is
    not read again; the others are hashed once, in parallel threads (hashlib releases the GIL), and remembered."""
    stats = {p: os.stat(p) for p in paths}
    known = _recalled([stat_key(st) for st in stats.values()]) if trust_cache else {}
    todo = [p for p, st in stats.items() if stat_key(st) not in known]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2))) as pool:
        fresh = dict(zip(todo, pool.map(sha256_file, todo)))
    remember([(stat_key(stats[p]), d) for p, d in fresh.items()])
    return {p: {"size": st.st_size, "sha256": fresh.get(p) or known[stat_key(st)]} for p, st in stats.items()}


def cached_sha256(path: Path) -> str:
    """The SHA-256 of a (large, unchanged) local source file, read only when it changed since it was last hashed."""
    return digest_files([Path(path)])[Path(path)]["sha256"]


class HashingWriter(io.RawIOBase):
    """A binary file that hashes what is written to it, so its digest costs no second read.

    ``with HashingWriter(path) as f: f.write(...)``; then ``f.record`` is ``{"size", "sha256"}``.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self.record: dict | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = self._file.write(data)
        self._hash.update(memoryview(data)[:n])
        self._size += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._file.close()
            self.record = {"size": self._size, "sha256": self._hash.hexdigest()}
            remember([(stat_key(os.stat(self.path)), self.record["sha256"])])
        super().close()


def write_bytes(path: Path, data: bytes) -> dict:
    """Write a file and return its ``{"size", "sha256"}`` (hashed from memory, not re-read)."""
    with HashingWriter(path) as f:
        f.write(data)
    return f.record
