"""The document store: collections, documents, chunks and their embeddings in SQLite.

SQLite is the source of truth. Embeddings are kept as float32 blobs so a
collection's FAISS index can always be rebuilt from the store; a document is
durable once its transaction commits (WAL, ``synchronous=FULL``). Nothing is
pickled: metadata and heading paths are JSON.

Not thread-safe: the service drives one store from one thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rag.chunker import Chunk
from rag.embedding import Vectors

__all__ = ["ChunkHit", "CollectionRow", "DocumentRow", "DocumentStore", "DuplicateDocument", "NewDocument"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY, created_at REAL NOT NULL, dimension INTEGER NOT NULL, model TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    collection TEXT NOT NULL REFERENCES collections(name) ON DELETE CASCADE,
    title TEXT NOT NULL, sha256 TEXT NOT NULL, format TEXT NOT NULL, bytes INTEGER NOT NULL,
    metadata TEXT NOT NULL, created_at REAL NOT NULL, chunk_count INTEGER NOT NULL,
    UNIQUE (collection, sha256));
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    collection TEXT NOT NULL, chunk_index INTEGER NOT NULL, text TEXT NOT NULL,
    heading_path TEXT NOT NULL, tokens INTEGER NOT NULL, embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks (document_id);
CREATE INDEX IF NOT EXISTS chunks_by_collection ON chunks (collection, id);
"""


class DuplicateDocument(Exception):
    """The collection already holds a document with this content hash."""


@dataclass(frozen=True)
class CollectionRow:
    name: str
    created_at: float
    dimension: int
    model: str
    documents: int
    chunks: int
    bytes: int = 0


@dataclass(frozen=True)
class DocumentRow:
    id: str
    collection: str
    title: str
    sha256: str
    format: str
    bytes: int
    metadata: dict[str, Any]
    created_at: float
    chunk_count: int


@dataclass(frozen=True)
class NewDocument:
    id: str
    title: str
    sha256: str
    format: str
    bytes: int
    metadata: dict[str, Any]


@dataclass(frozen=True)
class ChunkHit:
    chunk_id: int
    document_id: str
    title: str
    chunk_index: int
    text: str
    heading_path: list[str]


def _document(row: sqlite3.Row) -> DocumentRow:
    return DocumentRow(
        row["id"],
        row["collection"],
        row["title"],
        row["sha256"],
        row["format"],
        row["bytes"],
        json.loads(row["metadata"]),
        row["created_at"],
        row["chunk_count"],
    )


class DocumentStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- collections ---------------------------------------------------------------------------

    def create_collection(self, name: str, dimension: int, model: str) -> bool:
        """False when it already exists."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO collections (name, created_at, dimension, model) VALUES (?, ?, ?, ?)",
            (name, time.time(), dimension, model),
        )
        return cursor.rowcount == 1

    def collections(self, name: str | None = None) -> list[CollectionRow]:
        rows = self._db.execute(
            """SELECT c.name, c.created_at, c.dimension, c.model,
                      (SELECT COUNT(*) FROM documents d WHERE d.collection = c.name) AS documents,
                      (SELECT COUNT(*) FROM chunks k WHERE k.collection = c.name) AS chunks,
                      (SELECT COALESCE(SUM(d.bytes), 0) FROM documents d WHERE d.collection = c.name) AS bytes
               FROM collections c WHERE ? IS NULL OR c.name = ? ORDER BY c.name""",
            (name, name),
        ).fetchall()
        return [CollectionRow(*row) for row in rows]

    def delete_collection(self, name: str) -> bool:
        with self._transaction():
            self._db.execute("DELETE FROM chunks WHERE collection = ?", (name,))
            self._db.execute("DELETE FROM documents WHERE collection = ?", (name,))
            return self._db.execute("DELETE FROM collections WHERE name = ?", (name,)).rowcount == 1

    # -- documents -----------------------------------------------------------------------------

    def find_by_sha256(self, collection: str, sha256: str) -> DocumentRow | None:
        row = self._db.execute(
            "SELECT * FROM documents WHERE collection = ? AND sha256 = ?", (collection, sha256)
        ).fetchone()
        return _document(row) if row else None

    def add_document(
        self, collection: str, doc: NewDocument, chunks: Sequence[Chunk], vectors: Vectors
    ) -> tuple[DocumentRow, npt.NDArray[np.int64]]:
        """Insert a document and its chunks in one durable transaction; returns the new chunk ids."""
        if len(chunks) != len(vectors):
            raise ValueError("one vector per chunk")
        now = time.time()
        try:
            with self._transaction():
                self._db.execute(
                    "INSERT INTO documents (id, collection, title, sha256, format, bytes, metadata, created_at,"
                    " chunk_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        doc.id,
                        collection,
                        doc.title,
                        doc.sha256,
                        doc.format,
                        doc.bytes,
                        json.dumps(doc.metadata, ensure_ascii=False),
                        now,
                        len(chunks),
                    ),
                )
                ids = []
                for chunk, vector in zip(chunks, vectors, strict=True):
                    cursor = self._db.execute(
                        "INSERT INTO chunks (document_id, collection, chunk_index, text, heading_path, tokens,"
                        " embedding) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            doc.id,
                            collection,
                            chunk.index,
                            chunk.text,
                            json.dumps(list(chunk.heading_path)),
                            chunk.tokens,
                            np.asarray(vector, dtype="<f4").tobytes(),
                        ),
                    )
                    ids.append(cursor.lastrowid)
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc):
                raise DuplicateDocument(doc.sha256) from None
            raise KeyError(collection) from None
        row = DocumentRow(
            doc.id, collection, doc.title, doc.sha256, doc.format, doc.bytes, doc.metadata, now, len(chunks)
        )
        return row, np.asarray(ids, dtype=np.int64)

    def documents(self, collection: str) -> list[DocumentRow]:
        rows = self._db.execute(
            "SELECT * FROM documents WHERE collection = ? ORDER BY created_at, id", (collection,)
        ).fetchall()
        return [_document(row) for row in rows]

    def document(self, collection: str, document_id: str) -> DocumentRow | None:
        row = self._db.execute(
            "SELECT * FROM documents WHERE collection = ? AND id = ?", (collection, document_id)
        ).fetchone()
        return _document(row) if row else None

    def delete_document(self, collection: str, document_id: str) -> npt.NDArray[np.int64] | None:
        """The chunk ids removed, or None when there was no such document."""
        with self._transaction():
            ids = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM chunks WHERE document_id = ? AND collection = ?", (document_id, collection)
                )
            ]
            deleted = self._db.execute(
                "DELETE FROM documents WHERE id = ? AND collection = ?", (document_id, collection)
            ).rowcount
        return np.asarray(ids, dtype=np.int64) if deleted else None

    # -- chunks --------------------------------------------------------------------------------

    def chunk_ids(self, collection: str) -> npt.NDArray[np.int64]:
        rows = self._db.execute("SELECT id FROM chunks WHERE collection = ? ORDER BY id", (collection,))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def embeddings(
        self, collection: str, ids: npt.NDArray[np.int64] | None = None, batch: int = 4096
    ) -> Iterator[tuple[npt.NDArray[np.int64], Vectors]]:
        """(ids, vectors) in batches: every chunk of the collection, or only ``ids``."""
        if ids is None:
            cursor = self._db.execute(
                "SELECT id, embedding FROM chunks WHERE collection = ? ORDER BY id", (collection,)
            )
            yield from _batched(cursor, batch)
            return
        cursor = self._db.execute(
            "SELECT id, embedding FROM chunks WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
            (json.dumps([int(i) for i in ids]),),
        )
        yield from _batched(cursor, batch)

    def chunks(self, ids: Sequence[int]) -> dict[int, ChunkHit]:
        if not ids:
            return {}
        rows = self._db.execute(
            "SELECT k.id, k.document_id, d.title, k.chunk_index, k.text, k.heading_path FROM chunks k"
            " JOIN documents d ON d.id = k.document_id WHERE k.id IN (SELECT value FROM json_each(?))",
            (json.dumps([int(i) for i in ids]),),
        )
        return {r[0]: ChunkHit(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows}

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _batched(cursor: sqlite3.Cursor, batch: int) -> Iterator[tuple[npt.NDArray[np.int64], Vectors]]:
    while rows := cursor.fetchmany(batch):
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
        yield ids, np.ascontiguousarray(vectors, dtype=np.float32)
