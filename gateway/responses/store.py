"""Stored responses: one SQLite file (WAL) under the gateway's data directory, rows owned by a key.

Every read, delete and listing is by (response id, key id): another key's response is as absent as one
that never existed. A response older than the retention is never read, and the maintenance task
(:meth:`ResponseStore.run_maintenance`, owned by the app's lifespan) deletes it. WAL with
``synchronous=NORMAL``: a committed response survives a gateway crash or restart; a power cut may lose
the last commits. Backups copy the file with SQLite's online backup API (``appliance.backup.snapshot``),
consistent while the gateway writes.

The request path (:meth:`put`, :meth:`get`, :meth:`delete`) runs its one statement on the event loop's
own connection: a primary-key insert, select or delete that touches the page cache and never syncs
(``synchronous=NORMAL`` in WAL mode syncs only at checkpoints, and automatic checkpoints are off). It takes
microseconds, where a hop to a worker thread and back cost milliseconds on a busy host (the Responses
request measured 6 ms slower than chat with it). What does sync or can take long, checkpoints and pruning,
runs in a worker thread on a second connection, pruning in small batches so that the loop's writes never
wait long for the lock.
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
from typing import Any

import msgspec

from gateway.responses.events import encode_json

__all__ = ["STORE_FILE", "ResponseStore", "StoredResponse"]

STORE_FILE = "responses.sqlite3"
_PRUNE_BATCH = 500
_log = logging.getLogger("gateway.responses")
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


def _connect(path: Path, *, same_thread: bool) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=2.0, check_same_thread=same_thread, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints (which sync) run in the maintenance thread
    return db


class ResponseStore:
    """The stored responses of every key, in ``directory/responses.sqlite3``.

    Made in the thread whose event loop serves requests: the request path uses that thread's connection."""

    def __init__(self, directory: Path, retention_days: float, clock: Callable[[], float] = time.time) -> None:
        self.path = directory / STORE_FILE
        self.retention_s = retention_days * 86400
        self._clock = clock
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = _connect(self.path, same_thread=True)
        os.chmod(self.path, 0o600)
        self._db.executescript(_SCHEMA)
        self._maintenance = _connect(self.path, same_thread=False)  # a worker thread's, under the lock
        self._maintenance_lock = threading.Lock()

    def close(self) -> None:
        """Close both connections (waits for a maintenance statement a cancelled task left running)."""
        self._db.close()
        with self._maintenance_lock:
            self._maintenance.close()

    def _cutoff(self) -> int:
        return int(self._clock() - self.retention_s)

    def put(self, key_id: str, stored: StoredResponse) -> None:
        response = stored.response
        self._db.execute(
            "INSERT OR REPLACE INTO responses (id, key_id, created_at, response, items, history) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (str(response["id"]), str(key_id), int(response["created_at"]), encode_json(response),
             encode_json(stored.items), encode_json(stored.history)))

    def get(self, response_id: str, key_id: str) -> StoredResponse | None:
        row = self._db.execute(
            "SELECT response, items, history FROM responses WHERE id = ? AND key_id = ? AND created_at >= ?",
            (str(response_id), str(key_id), self._cutoff())).fetchone()
        if row is None:
            return None
        response, items, history = (msgspec.json.decode(column) for column in row)
        return StoredResponse(response, items, history)

    def delete(self, response_id: str, key_id: str) -> bool:
        cursor = self._db.execute("DELETE FROM responses WHERE id = ? AND key_id = ? AND created_at >= ?",
                                  (str(response_id), str(key_id), self._cutoff()))
        return cursor.rowcount > 0

    def prune(self) -> int:
        """Delete the responses older than the retention (in batches); how many. Blocking: run it in a thread."""
        pruned = 0
        while True:
            with self._maintenance_lock:
                cursor = self._maintenance.execute(
                    "DELETE FROM responses WHERE rowid IN "
                    "(SELECT rowid FROM responses WHERE created_at < ? LIMIT ?)", (self._cutoff(), _PRUNE_BATCH))
            pruned += cursor.rowcount
            if cursor.rowcount < _PRUNE_BATCH:
                return pruned

    def checkpoint(self) -> None:
        """Move the WAL into the database file (and sync it). Blocking: run it in a thread."""
        with self._maintenance_lock:
            self._maintenance.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def run_maintenance(self, checkpoint_every_s: float, prune_every_s: float) -> None:
        """Checkpoint every ``checkpoint_every_s``, prune every ``prune_every_s``, until cancelled."""
        next_prune = 0.0
        while True:
            try:
                await asyncio.to_thread(self.checkpoint)
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + prune_every_s
                    pruned = await asyncio.to_thread(self.prune)
                    if pruned:
                        _log.info("pruned stored responses", extra={"pruned": pruned})
            except sqlite3.Error as exc:
                _log.error("stored responses maintenance failed", extra={"error": str(exc)})
            await asyncio.sleep(checkpoint_every_s)
