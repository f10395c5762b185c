"""Checking an audit log's chain, and reading it back for export.

:func:`verify_log` walks the file once and stops at the first bad record, naming its line and
``seq`` and what is wrong with it:

- ``unreadable``: the line is not an audit record (a byte edited into its JSON, a foreign line);
- ``partial``: the last line has no newline (the file was cut inside a record);
- ``edited``: a record's content does not match its own hash, or its hash was recomputed and the
  next record's ``prev`` no longer names it;
- ``removed``: ``seq`` jumps and the missing records are nowhere later in the file;
- ``reordered``: ``seq`` jumps and the missing record comes later, or ``seq`` goes backwards;
- ``truncated``: the log ends before an anchor's ``seq`` (records cut off its tail);
- ``rewritten``: the record at an anchor's ``seq`` has another hash (the chain was recomputed).

Without an anchor, cutting records off the tail, or recomputing the whole chain from some record on,
leaves a valid chain: that is what anchors kept outside the data directory are for.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import msgspec

from appliance.core.audit import GENESIS, AuditHead, AuditRecord

__all__ = ["Problem", "Verdict", "iter_lines", "read_records", "verify_log"]

Kind = Literal["unreadable", "partial", "edited", "removed", "reordered", "truncated", "rewritten"]


@dataclass(frozen=True)
class Problem:
    kind: Kind
    line: int  # 1-based line in the file (the last line for ``truncated``; 0 when the file is empty)
    seq: int | None  # the record this names, when known
    message: str


@dataclass(frozen=True)
class Verdict:
    records: int  # records checked before the first problem (all of them when intact)
    head: AuditHead | None  # the last good record
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


class _Strict(AuditRecord, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """An audit record as read back: a field nobody writes is a sign of editing."""


_DECODER = msgspec.json.Decoder(_Strict)


def _decode(raw: bytes) -> AuditRecord | None:
    try:
        return _DECODER.decode(raw)
    except msgspec.DecodeError:
        return None


_STORED = re.compile(rb'(\{.*),"hash":"([0-9a-f]{64})"\}', re.DOTALL)


def _own_hash_ok(raw: bytes) -> bool:
    """The line's bytes before ``"hash"`` hash to the value it names (byte for byte, not re-serialized)."""
    stored = _STORED.fullmatch(raw)
    return stored is not None and hashlib.sha256(stored[1] + b"}").hexdigest() == stored[2].decode()


def _appears_later(lines: Iterator[tuple[int, bytes]], seq: int) -> int | None:
    """The line of the record numbered ``seq`` among the remaining lines, if any."""
    for number, raw in lines:
        record = _decode(raw)
        if record is not None and record.seq == seq:
            return number
    return None


def _jump(record: AuditRecord, number: int, expected: int, rest: Iterator[tuple[int, bytes]]) -> Problem:
    if record.seq < expected:
        return Problem("reordered", number, record.seq,
                       f"record seq {record.seq} at line {number} comes after seq {expected - 1}")
    later = _appears_later(rest, expected)
    if later is not None:
        return Problem("reordered", number, record.seq,
                       f"record seq {record.seq} at line {number} comes before seq {expected} (at line {later})")
    missing = str(expected) if record.seq == expected + 1 else f"{expected}..{record.seq - 1}"
    return Problem("removed", number, expected, f"record seq {missing} is missing before line {number} "
                                                f"(seq {record.seq})")


def _check_anchors(record: AuditRecord, number: int, anchors: Sequence[AuditHead]) -> Problem | None:
    for anchor in anchors:
        if anchor.seq == record.seq and anchor.hash != record.hash:
            return Problem("rewritten", number, record.seq,
                           f"record seq {record.seq} at line {number} is not the one anchored ({anchor.hash[:16]}…): "
                           f"the chain was recomputed from here or before")
    return None


def iter_lines(handle: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline); a last line without newline ends in ``b"\\0"``."""
    for number, raw in enumerate(handle, start=1):
        yield number, raw[:-1] if raw.endswith(b"\n") else raw + b"\0"


def verify_log(path: Path, anchors: Sequence[AuditHead] = ()) -> Verdict:
    """Walk the chain in ``path`` and check it against ``anchors`` (heads remembered elsewhere)."""
    walk = _Walk(anchors)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return Verdict(0, None, _short_of(anchors, None, 0))
    with handle:
        lines = iter_lines(handle)
        for number, raw in lines:
            walk.last_line = number
            problem = walk.step(raw, number, lines)
            if problem is not None:
                return Verdict(walk.count, walk.head, problem)
    return Verdict(walk.count, walk.head, _short_of(anchors, walk.head, walk.last_line))


class _Walk:
    """The chain so far: the next seq expected and the hash the next record must name."""

    def __init__(self, anchors: Sequence[AuditHead]) -> None:
        self.anchors = anchors
        self.expected, self.prev, self.count, self.last_line = 1, GENESIS, 0, 0
        self.head: AuditHead | None = None

    def step(self, raw: bytes, number: int, rest: Iterator[tuple[int, bytes]]) -> Problem | None:
        record = _readable(raw, number, self.expected)
        if isinstance(record, Problem):
            return record
        problem = self._linked(record, number, rest) or _check_anchors(record, number, self.anchors)
        if problem is None:
            self.expected, self.prev, self.count = record.seq + 1, record.hash, self.count + 1
            self.head = AuditHead(record.seq, record.hash)
        return problem

    def _linked(self, record: AuditRecord, number: int, rest: Iterator[tuple[int, bytes]]) -> Problem | None:
        if record.seq != self.expected:
            return _jump(record, number, self.expected, rest)
        if record.prev == self.prev:
            return None
        if record.seq == 1:
            return Problem("edited", number, 1, f"record seq 1 at line {number} does not start the chain (its "
                                                f"prev is not {GENESIS[:8]}…): it was rewritten")
        return Problem("edited", number - 1, record.seq - 1,
                       f"record seq {record.seq - 1} at line {number - 1} was rewritten: the next record's "
                       f"prev names another hash")


def _readable(raw: bytes, number: int, expected: int) -> AuditRecord | Problem:
    if raw.endswith(b"\0"):
        return Problem("partial", number, None, f"line {number} is a partial record (no newline): the file was cut")
    record = _decode(raw)
    if record is None:
        return Problem("unreadable", number, expected, f"line {number} is not an audit record "
                                                       f"(seq {expected} was expected here)")
    if not _own_hash_ok(raw):
        return Problem("edited", number, record.seq,
                       f"record seq {record.seq} at line {number} does not match its hash: it was edited")
    return record


def _short_of(anchors: Sequence[AuditHead], head: AuditHead | None, last_line: int) -> Problem | None:
    """A log that ends before an anchor's seq lost its tail."""
    beyond = [anchor for anchor in anchors if anchor.seq > (head.seq if head else 0)]
    if not beyond:
        return None
    furthest = max(beyond, key=lambda anchor: anchor.seq)
    ends = f"seq {head.seq} at line {last_line}" if head else "no record"
    return Problem("truncated", last_line, furthest.seq,
                   f"the log ends at {ends}, but an anchor names seq {furthest.seq}: records were cut off its tail")


def read_records(path: Path, since: str = "") -> Iterator[bytes]:
    """The stored lines (exactly as written, without newline) of records whose ``time`` is at or after
    ``since`` (an ISO 8601 UTC prefix such as ``2026-12-08`` or ``2026-12-08T02:00``); unreadable lines
    are skipped (``verify`` names them)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        for _number, raw in iter_lines(handle):
            record = _decode(raw)
            if record is not None and record.time >= since:
                yield raw
