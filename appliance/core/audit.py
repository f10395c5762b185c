"""The audit log: who did what to what, append-only JSON lines, each record hash-chained to the one before.

A record is ``{"seq", "time", "actor", "action", "target", "outcome", "detail", "prev", "hash"}``.
``seq`` counts from 1; ``prev`` is the ``hash`` of the record before (64 zeros for the first); ``hash`` is
the SHA-256 of the line's own bytes up to ``,"hash":`` (closed with ``}``), so any changed byte shows. Editing,
removing or reordering a record breaks the chain where it happened (see :mod:`appliance.core.audit_verify`);
rewriting the whole chain from some record on is caught only against a head kept elsewhere (an anchor:
``seq:hash`` in the logs and in each backup manifest).

Several processes append to one file (the gateway, CLI commands): each append takes an exclusive
``fcntl.flock`` on the file, reads the head from the file's tail, writes one line with ``O_APPEND`` and
fsyncs before the lock is released. Prompts, answers and secrets never go in: only identifiers.
"""

from __future__ import annotations

import asyncio
import fcntl
import getpass
import hashlib
import logging
import math
import os
import re
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["AUDIT_FILE", "GENESIS", "AuditError", "AuditHead", "AuditLog", "AuditRecord", "DetailValue",
           "audit_path", "cli_actor", "log_anchor", "record_hash"]  # fmt: skip

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
DetailValue = str | int | float | bool

_log = logging.getLogger("appliance.audit")
_ACTION = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
_TAIL_CHUNK = 8192
_FIELD_LIMIT = 1024  # an actor/target/detail value longer than this is not an identifier
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1


class AuditError(Exception):
    """The audit log cannot be appended to (its last record is unreadable, or the file is not writable)."""


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    time: str
    actor: str
    action: str
    target: str
    outcome: str
    detail: dict[str, DetailValue]
    prev: str
    hash: str

    def line(self) -> bytes:
        """The record as stored: one JSON line, fields in the struct's order, ``hash`` last."""
        return _line(msgspec.structs.asdict(self), self.hash)


class AuditHead(msgspec.Struct, frozen=True):
    """The newest record's position and hash: what an anchor remembers."""

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> AuditHead:
        """``SEQ:HASH`` (as printed by :meth:`__str__`) into a head; ValueError when malformed."""
        seq, sep, digest = text.strip().partition(":")
        if not sep or not seq.isdigit() or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"an anchor is SEQ:HASH (a number, a colon, 64 lowercase hex digits), not {text!r}")
        return cls(int(seq), digest)


def record_hash(body: Mapping[str, Any]) -> str:
    """SHA-256 of a record's stored JSON without ``hash``: every field in order, compact, as msgspec writes it."""
    return hashlib.sha256(_body_bytes(body)).hexdigest()


def _body_bytes(body: Mapping[str, Any]) -> bytes:
    return msgspec.json.encode({name: value for name, value in body.items() if name != "hash"})


def _line(body: Mapping[str, Any], digest: str) -> bytes:
    """The stored line: the body's exact bytes with ``"hash"`` added last, so a check can hash what is stored."""
    return _body_bytes(body)[:-1] + b',"hash":"' + digest.encode() + b'"}\n'


def audit_path(data_dir: Path) -> Path:
    """Where the appliance keeps its audit log: ``<data_dir>/audit/audit.jsonl``."""
    return data_dir / "audit" / AUDIT_FILE


def cli_actor() -> str:
    """The actor of a CLI process: ``cli:<os user>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return f"cli:{user}"


def _checked(name: str, value: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > _FIELD_LIMIT or (not value and not empty):
        raise ValueError(f"audit {name} must be a string of 1..{_FIELD_LIMIT} characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"audit {name} is not Unicode text (a lone surrogate)") from None
    return value


def _detail(detail: Mapping[str, DetailValue] | None) -> dict[str, DetailValue]:
    out: dict[str, DetailValue] = {}
    for key, value in (detail or {}).items():
        if not isinstance(value, str | int | float | bool):
            raise ValueError(f"audit detail {key!r} must be a str, int, float or bool")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"audit detail {key!r} must be finite")
        if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"audit detail {key!r} must fit in 64 bits")
        if isinstance(value, str):
            _checked(f"detail {key!r}", value, empty=True)
        out[_checked("detail key", key)] = value
    return out


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _last_line(fd: int, size: int) -> bytes:
    """The last line of a non-empty file that ends in a newline, without that newline."""
    end = size - 1
    buffer = b""
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        buffer = os.pread(fd, end - start, start) + buffer
        end = start
        cut = buffer.rfind(b"\n")
        if cut >= 0:
            return buffer[cut + 1 :]
    return buffer


def _head_of(fd: int, size: int, path: Path) -> AuditHead | None:
    if size == 0:
        return None
    if os.pread(fd, 1, size - 1) != b"\n":
        raise AuditError(f"the audit log {path} ends in a partial record; run `appliance audit verify`")
    try:
        last = msgspec.json.decode(_last_line(fd, size), type=AuditRecord)
    except msgspec.DecodeError:
        raise AuditError(f"the last record of the audit log {path} is unreadable; run `appliance audit verify`"
                         ) from None
    return AuditHead(last.seq, last.hash)


class AuditLog:
    """One append-only, hash-chained audit file, shared by every process that opens the same path.

    ``anchor_every``: every that many records the head is also written to the structured log
    (``audit anchor`` with ``seq`` and ``hash``), so a journal kept off the data directory holds
    a recent anchor.
    """

    def __init__(self, path: Path, *, anchor_every: int = 100) -> None:
        self.path = path
        self._anchor_every = max(1, anchor_every)
        self._lock = threading.Lock()  # this process's threads; flock orders the processes

    def append(self, *, actor: str, action: str, target: str, outcome: str = "ok",
               detail: Mapping[str, DetailValue] | None = None) -> AuditRecord:
        """Append one record (fsync'd before returning) and return it."""
        if not _ACTION.fullmatch(action):
            raise ValueError(f"audit action must be a dotted name like key.create, not {action!r}")
        fields = {"actor": _checked("actor", actor), "action": action, "target": _checked("target", target),
                  "outcome": _checked("outcome", outcome), "detail": _detail(detail)}
        with self._lock:
            record = self._append_locked(fields)
        if record.seq % self._anchor_every == 0:
            log_anchor(AuditHead(record.seq, record.hash), "periodic")
        return record

    async def append_async(self, *, actor: str, action: str, target: str, outcome: str = "ok",
                           detail: Mapping[str, DetailValue] | None = None) -> AuditRecord:
        """:meth:`append` on a worker thread, for coroutines (the lock and fsync stay off the event loop)."""
        return await asyncio.to_thread(self.append, actor=actor, action=action, target=target, outcome=outcome,
                                       detail=detail)

    def head(self) -> AuditHead | None:
        """The newest record's ``seq`` and ``hash`` (None while the log is empty or absent)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return _head_of(fd, os.fstat(fd).st_size, self.path)
        finally:
            os.close(fd)

    def snapshot(self) -> tuple[bytes, AuditHead | None]:
        """The whole log as it stands (read under a shared lock, so no append is half in it) and its head."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return b"", None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            size = os.fstat(fd).st_size
            raw = os.pread(fd, size, 0)
            return raw, _head_of(fd, size, self.path)
        finally:
            os.close(fd)

    def _open(self) -> int:
        created = not self.path.exists()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        if created:
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the new file's name is durable too
            finally:
                os.close(dir_fd)
        return fd

    def _append_locked(self, fields: dict[str, Any]) -> AuditRecord:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            head = _head_of(fd, os.fstat(fd).st_size, self.path)
            body = {"seq": head.seq + 1 if head else 1, "time": _now(), **fields,
                    "prev": head.hash if head else GENESIS}
            record = AuditRecord(**body, hash=record_hash(body))
            _write_all(fd, _line(body, record.hash))
            os.fsync(fd)
            return record
        finally:
            os.close(fd)  # releases the flock


def log_anchor(head: AuditHead, reason: str) -> None:
    """Write the head to the structured log (stderr / the journal): an anchor outside the data directory."""
    _log.info("audit anchor", extra={"audit_seq": head.seq, "audit_hash": head.hash, "audit_anchor": str(head),
                                     "reason": reason})
