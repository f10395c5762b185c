"""Stored responses: one SQLite file (WAL) under the gateway's data directory, rows owned by a key.

Every read, delete and listing is by (response id, key id): another key's response is as absent as one
that never existed. A response older than the retention is never read, and :meth:`ResponseStore.prune`
deletes it (the app's lifespan runs it periodically). WAL with ``synchronous=NORMAL``: a committed
response survives a gateway crash or restart; a power cut may lose the last commits. Backups copy the
file with SQLite's online backup API (``appliance.backup.snapshot``), consistent while the gateway writes.

SQLite calls block, so each runs in a worker thread (one connection, serialised by a lock).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from gateway.responses.events import encode_json

__all__ = ["STORE_FILE", "ResponseStore", "StoredResponse"]

STORE_FILE = "responses.sqlite3"
_log = logging.getLogger("gateway.responses")
T = TypeVar("T")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    response BLOB NOT NULL,
    items BLOB NOT NULL,
    history BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: dict[str, Any]  # the Response object as it was answered
    items: list[dict[str, Any]]  # this turn's input items (``input_items``)
    history: list[dict[str, Any]]  # the conversation a next turn continues: earlier items, input, output


class ResponseStore:
    """The stored responses of every key, in ``directory/responses.sqlite3``."""

    def __init__(self, directory: Path, retention_days: float, clock: Callable[[], float] = time.time) -> None:
        self.path = directory / STORE_FILE
        self.retention_s = retention_days * 86400
        self._clock = clock
        self._lock = threading.Lock()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=10, check_same_thread=False, isolation_level=None)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    async def _call(self, fn: Callable[[], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn()
        return await asyncio.to_thread(locked)

    def _cutoff(self) -> int:
        return int(self._clock() - self.retention_s)

    async def put(self, key_id: str, stored: StoredResponse) -> None:
        response = stored.response
        row = (str(response["id"]), key_id, int(response["created_at"]), encode_json(response),
               encode_json(stored.items), encode_json(stored.history))
        await self._call(lambda: self._db.execute(
            "INSERT OR REPLACE INTO responses (id, key_id, created_at, response, items, history) "
            "VALUES (?, ?, ?, ?, ?, ?)", row))

    async def get(self, response_id: str, key_id: str) -> StoredResponse | None:
        row = await self._call(lambda: self._db.execute(
            "SELECT response, items, history FROM responses WHERE id = ? AND key_id = ? AND created_at >= ?",
            (str(response_id), str(key_id), self._cutoff())).fetchone())
        if row is None:
            return None
        response, items, history = (msgspec.json.decode(column) for column in row)
        return StoredResponse(response, items, history)

    async def delete(self, response_id: str, key_id: str) -> bool:
        cursor = await self._call(lambda: self._db.execute(
            "DELETE FROM responses WHERE id = ? AND key_id = ? AND created_at >= ?",
            (str(response_id), str(key_id), self._cutoff())))
        return cursor.rowcount > 0

    async def prune(self) -> int:
        """Delete the responses older than the retention; how many."""
        cursor = await self._call(lambda: self._db.execute(
            "DELETE FROM responses WHERE created_at < ?", (self._cutoff(),)))
        return int(cursor.rowcount)

    async def run_pruning(self, every_s: float) -> None:
        """Prune now and every ``every_s`` seconds until cancelled (owned by the app's lifespan)."""
        while True:
            try:
                pruned = await self.prune()
            except sqlite3.Error as exc:
                _log.error("pruning stored responses failed", extra={"error": str(exc)})
            else:
                if pruned:
                    _log.info("pruned stored responses", extra={"pruned": pruned})
            await asyncio.sleep(every_s)
