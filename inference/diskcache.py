"""The host-RAM prompt cache of one model on disk, so it outlives the model's context: a swap, a restart.

``<data_dir>/kvcache/<sha256 of the GGUF>/<entry>.kv``, one file per saved prefix (its tokens and its KV
cells as llama.cpp sequence state), and ``slots.kvs``, the slots as they were (inference.kvsnapshot). The
model's sha256 names the directory and is inside every file, so a state is only ever restored into the
weights that computed it, whatever alias they are served under.

A file is written to a temporary name, fsynced and renamed, so a reader sees a whole file or none. Each
file ends with an HMAC-SHA256 over everything before it, keyed from the internal token: a truncated or
flipped file, a file of another model or another context layout, or one planted by a process that cannot
read the token is ignored (logged) on read, never restored and never a crash. ``bound_bytes`` caps every
model's files together; the most recently written stay.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.durable import fsync_path
from appliance.core.ids import KeyId
from inference.kvstore import ContextSnapshot, SavedPrefix
from inference.prefix import Scope

__all__ = ["CacheReport", "DiskPromptCache"]

log = logging.getLogger(__name__)

MAGIC = b"APKVC001"
SUFFIX = ".kv"
SNAPSHOT_MAGIC = b"APKVS001"
SNAPSHOT_NAME = "slots.kvs"
_LENGTH = struct.Struct("<I")
_MAC_BYTES = 32
_HEADER_MAX = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DOMAIN = b"appliance-prompt-cache-files-v1"


@dataclass(frozen=True, slots=True)
class CacheReport:
    """What a save wrote or a load read: prefixes, their tokens, bytes; files ignored as unreadable."""

    prefixes: int = 0
    tokens: int = 0
    bytes: int = 0
    ignored: int = 0


def _tokens_bytes(tokens: Sequence[int]) -> bytes:
    values = array("I", tokens)
    if values.itemsize != 4:  # pragma: no cover - every platform we run on has a 4-byte unsigned int
        raise RuntimeError("array('I') is not 4 bytes here")
    if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big-endian host
        values.byteswap()
    return values.tobytes()


def _tokens_from(raw: bytes) -> tuple[int, ...]:
    values = array("I")
    values.frombytes(raw)
    if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big-endian host
        values.byteswap()
    return tuple(values)


class DiskPromptCache:
    def __init__(self, root: Path, secret: str, bound_bytes: int) -> None:
        self.root = root
        self.bound = bound_bytes
        self._key = hmac.new(secret.encode(), _DOMAIN, hashlib.sha256).digest()

    def directory(self, model_sha256: str) -> Path:
        if not _SHA256.fullmatch(model_sha256):
            raise ValueError("a model's files are named by its lowercase sha256")
        return self.root / model_sha256

    # -- writing --

    def encode(self, model_sha256: str, layout: str, entry: SavedPrefix) -> bytes:
        header = json.dumps({"model": model_sha256, "layout": layout, "scope": entry.scope,
                             "tokens": len(entry.tokens), "state": len(entry.state)}).encode()
        body = b"".join((MAGIC, _LENGTH.pack(len(header)), header, _tokens_bytes(entry.tokens), entry.state))
        return body + hmac.new(self._key, body, hashlib.sha256).digest()

    def save(self, model_sha256: str, layout: str, entries: Sequence[SavedPrefix]) -> CacheReport:
        """Write ``entries`` (most valuable first) as far as the bound allows; blocking. The model's older files
        stay (their cells are still this model's) until the bound needs their room: the oldest go first."""
        if self.bound <= 0:
            return CacheReport()
        directory = self.directory(model_sha256)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept: set[str] = set()
        left, tokens, written = self.bound, 0, 0
        for entry in entries:
            if entry.model != model_sha256:
                continue  # never file a state under weights that did not compute it
            data = self.encode(model_sha256, layout, entry)
            if len(data) > left:
                continue
            name = hashlib.sha256(data[: -_MAC_BYTES]).hexdigest()[:32] + SUFFIX
            _write_or_touch(directory / name, data)
            kept.add(name)
            left -= len(data)
            tokens += len(entry.tokens)
            written += len(data)
        fsync_path(directory)
        self._prune()
        return CacheReport(prefixes=len(kept), tokens=tokens, bytes=written)

    def _prune(self) -> None:
        """Every model's files together within the bound: the oldest go first."""
        files: list[tuple[float, int, Path]] = []
        for path in [*self.root.glob(f"*/*{SUFFIX}"), *self.root.glob(f"*/{SNAPSHOT_NAME}")]:
            with contextlib.suppress(OSError):
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda item: item[0]):
            if total <= self.bound:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size

    # -- reading --

    def load(self, model_sha256: str, layout: str, *, capacity: int, max_tokens: int
             ) -> tuple[list[SavedPrefix], CacheReport]:
        """The model's saved prefixes, most recently saved first, within ``capacity`` bytes of state; blocking.

        A file that fails any check is skipped with a warning (it is replaced by the model's next save)."""
        directory = self.directory(model_sha256)
        if not directory.is_dir():
            return [], CacheReport()
        paths: list[tuple[float, Path]] = []
        for path in directory.glob(f"*{SUFFIX}"):
            with contextlib.suppress(OSError):
                paths.append((path.stat().st_mtime, path))
        entries: list[SavedPrefix] = []
        left, tokens, ignored = capacity, 0, 0
        for _, path in sorted(paths, key=lambda item: item[0], reverse=True):
            try:
                if path.stat().st_size > left + _HEADER_MAX + 4 * max_tokens + 64:
                    continue  # cannot fit what is left of the cache: not worth reading
                entry = self.decode(path.read_bytes(), model_sha256, layout, max_tokens)
            except (OSError, ValueError) as exc:
                ignored += 1
                log.warning("prompt cache file ignored", extra={"file": path.name, "reason": str(exc)[:200]})
                continue
            if len(entry.state) > left:
                continue
            entries.append(entry)
            left -= len(entry.state)
            tokens += len(entry.tokens)
        return entries, CacheReport(prefixes=len(entries), tokens=tokens, bytes=capacity - left, ignored=ignored)

    def decode(self, data: bytes, model_sha256: str, layout: str, max_tokens: int) -> SavedPrefix:
        """One file's prefix; ValueError naming what is wrong with it."""
        header, payload = self._verified(data, MAGIC, model_sha256, layout)
        count, size, scope = header.get("tokens"), header.get("state"), header.get("scope")
        if not (isinstance(count, int) and isinstance(size, int) and 0 < count <= max_tokens and size > 0):
            raise ValueError("its sizes are out of range")
        if 4 * count + size != len(payload):
            raise ValueError("its length does not match its header")
        return SavedPrefix(model_sha256, _scope(scope), _tokens_from(payload[: 4 * count]), payload[4 * count :])

    def _verified(self, data: bytes, magic: bytes, model_sha256: str, layout: str) -> tuple[dict[str, Any], bytes]:
        """A file's header and what follows it, once its MAC, model and layout are this appliance's and ours."""
        fixed = len(magic) + _LENGTH.size
        if len(data) < fixed + _MAC_BYTES or not data.startswith(magic):
            raise ValueError("not a prompt cache file")
        body, mac = data[:-_MAC_BYTES], data[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, hmac.new(self._key, body, hashlib.sha256).digest()):
            raise ValueError("its MAC does not match (damaged, or not written with this appliance's token)")
        (header_len,) = _LENGTH.unpack_from(body, len(magic))
        if header_len > _HEADER_MAX or fixed + header_len > len(body):
            raise ValueError("its header is too long")
        header = json.loads(body[fixed : fixed + header_len])
        if not isinstance(header, dict):
            raise ValueError("its header is not an object")
        if header.get("model") != model_sha256:
            raise ValueError("it holds another model's cells")
        if header.get("layout") != layout:
            raise ValueError("it was saved from another context layout")
        return header, body[fixed + header_len :]

    # -- the slots as they were (inference.kvsnapshot) --

    def save_snapshot(self, snapshot: ContextSnapshot, layout: str) -> int:
        """Write the slots' snapshot (the model's one, replacing the last); its size, 0 when it is not kept."""
        if self.bound <= 0 or not snapshot.state:
            return 0
        header = json.dumps({"model": snapshot.model, "layout": layout,
                             "slots": [{"scope": scope, "tokens": len(tokens)} for scope, tokens in snapshot.slots],
                             "state": len(snapshot.state)}).encode()
        if len(header) > _HEADER_MAX:
            return 0
        body = b"".join((SNAPSHOT_MAGIC, _LENGTH.pack(len(header)), header,
                         *(_tokens_bytes(tokens) for _, tokens in snapshot.slots), snapshot.state))
        data = body + hmac.new(self._key, body, hashlib.sha256).digest()
        if len(data) > self.bound:
            return 0
        directory = self.directory(snapshot.model)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomically(directory / SNAPSHOT_NAME, data)
        fsync_path(directory)
        return len(data)

    def load_snapshot(self, model_sha256: str, layout: str, max_tokens: int) -> ContextSnapshot | None:
        """The model's slots' snapshot when there is one that passes every check (else None, logged)."""
        path = self.directory(model_sha256) / SNAPSHOT_NAME
        try:
            if path.stat().st_size > self.bound:
                return None
            header, payload = self._verified(path.read_bytes(), SNAPSHOT_MAGIC, model_sha256, layout)
            slots, size = header.get("slots"), header.get("state")
            if not (isinstance(slots, list) and isinstance(size, int) and size > 0):
                raise ValueError("its sizes are out of range")
            counts: list[int] = []
            for slot in slots:
                count = slot.get("tokens") if isinstance(slot, dict) else None
                if not isinstance(count, int) or not 0 <= count <= max_tokens:
                    raise ValueError("a slot holds more tokens than the context")
                counts.append(count)
            if 4 * sum(counts) + size != len(payload):
                raise ValueError("its length does not match its header")
            held, offset = [], 0
            for slot, count in zip(slots, counts, strict=True):
                held.append((_scope(slot.get("scope")), _tokens_from(payload[offset : offset + 4 * count])))
                offset += 4 * count
            return ContextSnapshot(model_sha256, tuple(held), payload[offset:])
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("prompt cache file ignored", extra={"file": path.name, "reason": str(exc)[:200]})
            return None


def _scope(raw: object) -> Scope:
    if raw is None:
        return None
    if not KeyId.matches(raw):
        raise ValueError("its scope is not a key id")
    return KeyId.trusted(raw)


def _write_or_touch(path: Path, data: bytes) -> None:
    """A file is named by its content: one already there whole (read back, saved again) is only marked newest."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            os.utime(path)
            return
    except OSError:
        pass
    _write_atomically(path, data)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
