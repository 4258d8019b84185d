"""Cheap checks of the files a recipe names, run by `validate` and before every run: a broken file is found in a
second, named, instead of as a bare library error minutes into the run. Each returns a problem or None."""

from __future__ import annotations

import codecs
import json
import struct
from pathlib import Path

GGUF_MAGIC = b"GGUF"


def gguf_problem(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        return f"not a GGUF file (it starts with {head!r}, a GGUF file with {GGUF_MAGIC!r}): {path}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Header length, header JSON and the tensor data it promises, against the file's size (no tensor is read)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            return f"truncated safetensors file ({size} bytes, no header): {path}"
        (header_len,) = struct.unpack("<Q", raw_len)
        if 8 + header_len > size:
            return f"truncated safetensors file (header of {header_len} bytes, file of {size}): {path}"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f"corrupt safetensors file (its header is not JSON): {path}"
    ends = [t["data_offsets"][1] for name, t in header.items()
            if name != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        return f"truncated safetensors file (its tensors need {needed} bytes, the file has {size}): {path}"
    return None


def checkpoint_problems(directory: Path) -> list[str]:
    return [p for f in sorted(directory.glob("*.safetensors")) if (p := safetensors_problem(f))]


def data_file_problem(path: Path) -> str | None:
    """An empty calibration file (or only blank lines) has nothing to sample."""
    with path.open("rb") as f:
        head = f.read(1 << 16)
    if path.suffix != ".parquet" and not head.strip():
        return f"empty file: {path}"
    if path.suffix == ".parquet" and path.stat().st_size == 0:
        return f"empty file: {path}"
    if path.suffix != ".parquet":
        return utf8_problem(path)
    return None


def utf8_problem(path: Path, chunk: int = 1 << 20) -> str | None:
    """Text files are read as UTF-8 by the calibration stage: a file that is not is named here, with the offset of
    its first bad byte, not as a UnicodeDecodeError an hour in. Streams the file (about 1 GB/s), holds 1 MiB."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the first byte the decoder has not consumed
    with path.open("rb") as f:
        while True:
            block = f.read(chunk)
            pending = decoder.getstate()[0]
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                data = pending + block
                return (f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {offset - len(pending) + exc.start} "
                        f"({exc.reason}); re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8): {path}")
            if not block:
                return None
            offset += len(block)
