"""Safetensors shards written by a library, hashed as each one is closed, while the library writes the next.

ModelOpt's ``export_hf_checkpoint`` writes through transformers' ``save_pretrained``, one shard at a time with
``safetensors.torch.save_file`` (which holds the GIL). During :func:`hashing_shard_writes`, each shard, once
written, is hashed by a separate Python process (no GIL shared with the exporter) from the page cache, while the
exporter goes on with the next shard; with small shards only the last one's hash is left when the export returns.
The digests go to the manifest (``store.write_manifest(files=...)``) and to the digest cache: computed once, never
by a second pass over the tree. (Serialising shards to memory and writing them from threads was measured slower on
the H200: safetensors' in-memory ``save`` copies every tensor once more.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from tasks.store import digests

_HASHER = ("import hashlib, sys\nh = hashlib.sha256()\nwith open(sys.argv[1], 'rb') as f:\n"
           "    while block := f.read(1 << 24):\n        h.update(block)\nprint(h.hexdigest())")


@contextlib.contextmanager
def hashing_shard_writes(under: Path) -> Iterator[dict[str, dict]]:
    """Within the block, each safetensors shard transformers writes under ``under`` is hashed as soon as it is
    written; on exit the yielded dict holds ``{relpath: {"size", "sha256"}}`` for them."""
    import transformers.modeling_utils as modeling_utils

    under = Path(under).resolve()
    original = modeling_utils.safe_save_file
    hashers: list[tuple[Path, subprocess.Popen]] = []
    records: dict[str, dict] = {}

    def save_file(tensors, filename, metadata=None):
        result = original(tensors, filename, metadata=metadata)
        path = Path(filename).resolve()
        if under in path.parents:
            hashers.append((path, subprocess.Popen([sys.executable, "-c", _HASHER, str(path)],
                                                   stdout=subprocess.PIPE, text=True)))
        return result

    modeling_utils.safe_save_file = save_file
    try:
        yield records
    finally:
        modeling_utils.safe_save_file = original
        outputs = [(path, proc.communicate()[0].strip(), proc.returncode) for path, proc in hashers]
    for path, digest, rc in outputs:
        if rc != 0 or len(digest) != 64:
            raise RuntimeError(f"hashing {path} failed (exit {rc}); the export is not recorded")
        records[path.relative_to(under).as_posix()] = {"size": path.stat().st_size, "sha256": digest}
    digests.remember([(digests.stat_key(os.stat(under / rel)), r["sha256"]) for rel, r in records.items()])
