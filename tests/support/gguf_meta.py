"""Read and rewrite a GGUF file's metadata strings (tests only: builds hostile model files from the real one).

GGUF v2/v3 layout: header (magic, version, tensor count, key/value count),
the key/values, the tensor infos, padding to ``general.alignment`` (32 by
default), then the tensor data, whose offsets are relative to its start. So a
metadata string can change length: rewrite the head, re-pad, copy the data.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import BinaryIO

__all__ = ["read_string_metadata", "write_with_string_metadata"]

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, UINT32 = 8, 9, 4


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, size: int) -> bytes:
        chunk = self.data[self.pos : self.pos + size]
        if len(chunk) != size:
            raise ValueError("truncated GGUF header")
        self.pos += size
        return chunk

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.u64())

    def skip_value(self, kind: int) -> None:
        if kind == STRING:
            self.string()
        elif kind == ARRAY:
            item_kind, count = self.u32(), self.u64()
            if item_kind in _SCALAR_SIZES:
                self.take(_SCALAR_SIZES[item_kind] * count)
            else:
                for _ in range(count):
                    self.skip_value(item_kind)
        else:
            self.take(_SCALAR_SIZES[kind])


def _string_value(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<IQ", STRING, len(raw)) + raw


def _parse(head: bytes) -> tuple[int, int, list[tuple[str, int, bytes]], int, int, int]:
    """(version, tensors, [(key, type, raw value)], tensor-info start, data start, alignment)."""
    reader = _Reader(head)
    if reader.take(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    version, tensors, count = reader.u32(), reader.u64(), reader.u64()
    entries: list[tuple[str, int, bytes]] = []
    alignment = 32
    for _ in range(count):
        key = reader.string().decode("utf-8")
        kind = reader.u32()
        start = reader.pos
        reader.skip_value(kind)
        raw = head[start : reader.pos]
        if key == "general.alignment" and kind == UINT32:
            alignment = int(struct.unpack("<I", raw)[0])
        entries.append((key, kind, raw))
    infos_start = reader.pos
    for _ in range(tensors):
        reader.string()
        dims = reader.u32()
        reader.take(8 * dims + 4 + 8)  # dims, type, offset
    data_start = -(-reader.pos // alignment) * alignment
    return version, tensors, entries, infos_start, data_start, alignment


def _head(path: Path, size: int = 64 << 20) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def read_string_metadata(path: Path, key: str) -> str | None:
    _, _, entries, _, _, _ = _parse(_head(path))
    for name, kind, raw in entries:
        if name == key and kind == STRING:
            return raw[8:].decode("utf-8")
    return None


def write_with_string_metadata(source: Path, target: Path, values: dict[str, str]) -> None:
    """Copy ``source`` to ``target`` with the given string keys set (replaced or added)."""
    head = _head(source)
    version, tensors, entries, infos_start, data_start, alignment = _parse(head)
    pending = dict(values)
    out = [(name, kind, raw) if name not in pending else (name, STRING, b"") for name, kind, raw in entries]
    out += [(name, STRING, b"") for name in pending if name not in {e[0] for e in entries}]
    body = bytearray(b"GGUF" + struct.pack("<IQQ", version, tensors, len(out)))
    for name, kind, raw in out:
        key = name.encode("utf-8")
        body += struct.pack("<Q", len(key)) + key
        body += _string_value(pending[name]) if name in pending else struct.pack("<I", kind) + raw
    body += head[infos_start : _tensor_infos_end(head, infos_start, tensors)]
    body += b"\0" * (-len(body) % alignment)
    with source.open("rb") as src, target.open("wb") as dst:
        dst.write(body)
        src.seek(data_start)
        _copy(src, dst)


def _tensor_infos_end(head: bytes, start: int, tensors: int) -> int:
    reader = _Reader(head)
    reader.pos = start
    for _ in range(tensors):
        reader.string()
        reader.take(8 * reader.u32() + 4 + 8)
    return reader.pos


def _copy(src: BinaryIO, dst: BinaryIO) -> None:
    shutil.copyfileobj(src, dst, 16 << 20)
