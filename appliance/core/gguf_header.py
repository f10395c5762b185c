"""What a GGUF file's header says about memory: the KV cache bytes one token of context costs.

GGUF v2/v3: magic ``GGUF``, version (u32), tensor count (u64), key/value count (u64), then the key/values
(key: u64 length + UTF-8; type: u32; value). Only the key/values are read, streamed from the file, so a
many-GiB model costs a few KiB of reading. A file that is not a GGUF, or is cut short, raises
:class:`GGUFError` with one sentence; nothing is loaded or executed.

KV bytes per token (f16 cache, llama.cpp's default): ``layers x kv_heads x (key_length + value_length) x 2``,
with ``key_length``/``value_length`` defaulting to ``embedding_length / head_count`` and ``head_count_kv``
to ``head_count``; a per-layer ``head_count_kv`` array is summed over the layers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["GGUFError", "KVShape", "kv_shape"]

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_KEYS = 1 << 16
_MAX_STRING = 1 << 26  # a tokenizer's merges or a chat template, never more
_F16_BYTES = 2

Value = int | float | str | list[int | float | str]


class GGUFError(ValueError):
    """The file is not a GGUF model this code can read the shape of."""


@dataclass(frozen=True)
class KVShape:
    architecture: str
    layers: int
    kv_heads: int  # summed over layers when per layer, divided back by layers (the mean)
    key_length: int
    value_length: int
    bytes_per_token: int


class _Stream:
    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self._handle, self._path = handle, path

    def take(self, size: int) -> bytes:
        chunk = self._handle.read(size)
        if len(chunk) != size:
            raise GGUFError(f"{self._path} is cut short (its GGUF header ends early)")
        return chunk

    def unpack(self, fmt: str) -> int | float:
        value: int | float = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def u32(self) -> int:
        return int(self.unpack("<I"))

    def u64(self) -> int:
        return int(self.unpack("<Q"))

    def string(self) -> str:
        size = self.u64()
        if size > _MAX_STRING:
            raise GGUFError(f"{self._path} has a {size}-byte string in its header: not a GGUF this code reads")
        return self.take(size).decode("utf-8", errors="replace")

    def value(self, kind: int, wanted: bool) -> Value | None:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            if not wanted:
                self._handle.seek(self.u64(), 1)
                return None
            return self.string()
        if kind != _ARRAY:
            raise GGUFError(f"{self._path} has a metadata value of unknown type {kind}")
        item_kind, count = self.u32(), self.u64()
        if not wanted:  # skip big arrays (the vocabulary, its scores) without decoding them
            if item_kind in _SCALARS:
                self._handle.seek(struct.calcsize(_SCALARS[item_kind]) * count, 1)
            else:
                for _ in range(count):
                    self.value(item_kind, False)
            return None
        items = [self.value(item_kind, wanted) for _ in range(count)]
        return [item for item in items if isinstance(item, int | float | str)]


def _metadata(path: Path, suffixes: tuple[str, ...]) -> dict[str, Value]:
    """``general.architecture`` and every key ending in one of ``suffixes`` (other values are skipped)."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        stream = _Stream(handle, path)
        if stream.take(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file")
        version = stream.u32()
        if version not in (2, 3):
            raise GGUFError(f"{path} is GGUF version {version}; versions 2 and 3 are read")
        stream.u64()  # tensor count
        count = stream.u64()
        if count > _MAX_KEYS:
            raise GGUFError(f"{path} claims {count} metadata keys: not a GGUF this code reads")
        found: dict[str, Value] = {}
        for _ in range(count):
            key = stream.string()
            keep = key == "general.architecture" or key.endswith(suffixes)
            value = stream.value(stream.u32(), keep)
            if keep and value is not None:
                found[key] = value
        return found


def _int(meta: dict[str, Value], key: str, path: Path) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, list):
        numbers = [int(v) for v in value if isinstance(v, int | float)]
        return sum(numbers) // len(numbers) if numbers else None
    if isinstance(value, str):
        raise GGUFError(f"{path}: {key} is text, not a number")
    return int(value)


def kv_shape(path: Path) -> KVShape:
    """The model's layers, KV heads and head sizes, and the f16 KV cache bytes per token of context."""
    keys = (".block_count", ".attention.head_count", ".attention.head_count_kv", ".embedding_length",
            ".attention.key_length", ".attention.value_length")
    meta = _metadata(path, keys)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFError(f"{path} names no general.architecture")
    layers = _int(meta, f"{arch}.block_count", path)
    heads = _int(meta, f"{arch}.attention.head_count", path)
    raw_kv = meta.get(f"{arch}.attention.head_count_kv")
    embedding = _int(meta, f"{arch}.embedding_length", path)
    if not layers or not heads or not embedding:
        raise GGUFError(f"{path} does not give {arch}.block_count, .attention.head_count and .embedding_length")
    key_length = _int(meta, f"{arch}.attention.key_length", path) or embedding // heads
    value_length = _int(meta, f"{arch}.attention.value_length", path) or embedding // heads
    if isinstance(raw_kv, list):  # per layer (some layers without attention have 0)
        per_layer = [int(v) for v in raw_kv if isinstance(v, int | float)]
        total_kv = sum(per_layer)
    else:
        total_kv = layers * (_int(meta, f"{arch}.attention.head_count_kv", path) or heads)
    bytes_per_token = total_kv * (key_length + value_length) * _F16_BYTES
    return KVShape(arch, layers, max(1, total_kv // layers), key_length, value_length, bytes_per_token)
