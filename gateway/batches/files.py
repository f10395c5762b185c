"""The Files API's store: each key's files on disk, ``<files_dir>/<key id>/<file id>`` and its ``.json``.

A file belongs to the key that uploaded it (or whose batch produced it): every read, listing and delete
goes through that key's own directory, so another key's file is as absent as one that never existed.
Content is written to a temporary name, fsync'd, then renamed into place with its metadata written
last: a file is listed only once it is whole. Blocking: the routes call these methods in a thread.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import msgspec

from appliance.core.durable import fsync_path
from appliance.core.ids import FileId, KeyId

__all__ = ["PURPOSES", "FileObject", "FileStore", "StorageFull"]

Purpose = Literal["batch", "batch_output"]
PURPOSES: tuple[Purpose, ...] = ("batch", "batch_output")
_META = ".json"


class StorageFull(Exception):
    """The key's files would exceed its allowance; ``allowed`` is what it may still store."""

    def __init__(self, allowed: int) -> None:
        super().__init__(f"{allowed} bytes left")
        self.allowed = allowed


class FileObject(msgspec.Struct, frozen=True, kw_only=True):
    """OpenAI's file object, as the API answers it."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: str = "file"
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileStore:
    """Every key's files under ``root``; ``per_key_bytes`` caps what one key holds (0 = no cap)."""

    def __init__(self, root: Path, *, per_key_bytes: int) -> None:
        self.root = root
        self.per_key_bytes = per_key_bytes
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _dir(self, key_id: str) -> Path:
        return self.root / KeyId.trusted(key_id)  # the key id came from a verified key: still checked for a path

    def content_path(self, key_id: str, file_id: FileId) -> Path:
        return self._dir(key_id) / file_id

    def used_bytes(self, key_id: str) -> int:
        return sum(item.bytes for item in self.list(key_id))

    def room(self, key_id: str) -> int | None:
        """How many bytes the key may still store (None: no cap)."""
        if not self.per_key_bytes:
            return None
        return max(0, self.per_key_bytes - self.used_bytes(key_id))

    def save(self, key_id: str, chunks: Iterable[bytes], *, filename: str, purpose: Purpose,
             file_id: FileId | None = None) -> FileObject:
        """Write ``chunks`` as a new file of the key (durable before this returns)."""
        directory = self._dir(key_id)
        directory.mkdir(mode=0o700, exist_ok=True)
        file_id = file_id or FileId.mint()
        temporary = directory / f".{file_id}.part"
        size = 0
        try:
            with temporary.open("wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    size += len(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            room = self.room(key_id)
            if room is not None and size > room:
                raise StorageFull(room)
            return self._publish(key_id, temporary, file_id, filename=filename, purpose=purpose, size=size)
        finally:
            temporary.unlink(missing_ok=True)

    def adopt(self, key_id: str, source: Path, file_id: FileId, *, filename: str) -> FileObject:
        """Make ``source`` (a finished batch's output, same file system) the key's file ``file_id``; idempotent."""
        existing = self.get(key_id, file_id)
        if existing is not None:
            return existing
        directory = self._dir(key_id)
        directory.mkdir(mode=0o700, exist_ok=True)
        linked = directory / f".{file_id}.part"
        linked.unlink(missing_ok=True)
        os.link(source, linked)  # the run keeps its own name for the file until the batch is recorded as done
        return self._publish(key_id, linked, file_id, filename=filename, purpose="batch_output",
                             size=linked.stat().st_size)

    def _publish(self, key_id: str, source: Path, file_id: FileId, *, filename: str, purpose: Purpose,
                 size: int) -> FileObject:
        directory = self._dir(key_id)
        item = FileObject(id=str(file_id), bytes=size, created_at=int(time.time()), filename=filename, purpose=purpose)
        os.replace(source, directory / file_id)
        meta = directory / f".{file_id}.meta"
        with meta.open("wb") as handle:
            handle.write(msgspec.json.encode(item))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(meta, directory / f"{file_id}{_META}")
        fsync_path(directory)
        return item

    def get(self, key_id: str, file_id: FileId) -> FileObject | None:
        try:
            raw = (self._dir(key_id) / f"{file_id}{_META}").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return msgspec.json.decode(raw, type=FileObject)

    def list(self, key_id: str) -> list[FileObject]:
        """The key's files, oldest first."""
        directory = self._dir(key_id)
        if not directory.is_dir():
            return []
        found = []
        for meta in directory.glob(f"file-*{_META}"):
            with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
                found.append(msgspec.json.decode(meta.read_bytes(), type=FileObject))
        return sorted(found, key=lambda item: (item.created_at, item.id))

    def delete(self, key_id: str, file_id: FileId) -> bool:
        directory = self._dir(key_id)
        meta = directory / f"{file_id}{_META}"
        if not meta.exists():
            return False
        meta.unlink()  # unlisted first: a half-deleted file is never served
        (directory / file_id).unlink(missing_ok=True)
        return True
