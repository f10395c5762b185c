"""Take a consistent snapshot of the live data while the stack serves."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from appliance.backup.archive import ArchiveWriter
from appliance.backup.manifest import Manifest
from appliance.core.model_files import sha256_file

__all__ = [
    "DERIVED",
    "SnapshotError",
    "add_files_store",
    "add_models",
    "add_rag_store",
    "add_responses_store",
    "copy_rag_store",
    "record_derived",
    "redis_bgsave",
]

SQLITE_MAGIC = b"SQLite format 3\x00"
# Caches re-created from what the backup does hold: left out of archives, named in the manifest with how.
# (A backup of a fresh stack was 83 MB, nearly all of it the ONNX export of the embedding model.)
DERIVED = {
    "onnx": "the RAG service exports its embedding model (settings rag.embedding_model) to ONNX at start when "
    "this directory lacks it (rag/onnx_model.py cached_export, keyed by the model files' fingerprint)",
}


class SnapshotError(Exception):
    """A snapshot could not be taken; the message says which part."""


def redis_bgsave(client: redis.Redis, timeout: float = 120.0) -> tuple[Path, int]:
    """BGSAVE and wait until it finished; returns the RDB path and the key count at save time."""
    try:
        before = int(client.lastsave().timestamp())
        # LASTSAVE has one-second resolution: make sure our save lands in a later second.
        while int(time.time()) <= before:
            time.sleep(0.05)
        keys = int(client.dbsize())
        try:
            client.bgsave()
        except redis.ResponseError as exc:  # a save already running is fine: wait for a newer one
            if "already in progress" not in str(exc):
                raise
        deadline = time.monotonic() + timeout
        while int(client.lastsave().timestamp()) <= before:
            if time.monotonic() > deadline:
                raise SnapshotError(f"Redis BGSAVE did not finish in {timeout:.0f}s")
            time.sleep(0.1)
        if client.info("persistence").get("rdb_last_bgsave_status") != "ok":
            raise SnapshotError("Redis BGSAVE failed (rdb_last_bgsave_status is not ok)")
        directory = str(client.config_get("dir")["dir"])
        filename = str(client.config_get("dbfilename")["dbfilename"])
    except redis.RedisError as exc:
        raise SnapshotError(f"Redis is not reachable for the backup ({type(exc).__name__})") from exc
    return Path(directory) / filename, keys


def copy_rag_store(source: Path, target: Path, progress: Callable[[str], None] | None = None) -> list[Path]:
    """Copy the RAG directory: SQLite files through the online backup API, index files as bytes.

    The RAG service can rebuild any index from the embeddings kept in SQLite, so an
    index copied a moment before or after the database is reconciled at load.
    """
    copied: list[Path] = []
    if not source.is_dir():
        return copied
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.name.endswith(("-wal", "-shm", "-journal", ".tmp")):
            continue
        if path.relative_to(source).parts[0] in DERIVED:
            continue
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with path.open("rb") as handle:
            is_sqlite = handle.read(16) == SQLITE_MAGIC
        if is_sqlite:
            src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            dst = sqlite3.connect(dest)
            try:
                src.backup(dst)
            finally:
                dst.close()
                src.close()
        else:
            shutil.copy2(path, dest)
        copied.append(dest)
        if progress:
            progress(str(path.relative_to(source)))
    return copied


def record_derived(manifest: Manifest, source: Path, prefix: str) -> None:
    """Name in the manifest each derived directory left out of ``source``: its size and what re-creates it."""
    for name, recreated_by in DERIVED.items():
        directory = source / name
        if not directory.is_dir():
            continue
        files = [p for p in directory.rglob("*") if p.is_file()]
        manifest.derived.append(
            {
                "path": f"{prefix}/{name}",
                "files": len(files),
                "bytes": sum(p.stat().st_size for p in files),
                "recreated_by": recreated_by,
                "entries": sorted(p.name for p in directory.iterdir() if p.is_dir()),
            }
        )


def add_rag_store(writer: ArchiveWriter, data_dir: Path) -> None:
    """The RAG store, copied consistently beside the data, then archived; derived files named, not stored."""
    with tempfile.TemporaryDirectory(prefix=".backup-rag-", dir=data_dir) as staging:
        copy_rag_store(data_dir / "rag", Path(staging) / "rag")
        writer.add_tree(Path(staging) / "rag", "rag")
    record_derived(writer.manifest, data_dir / "rag", "rag")


def add_responses_store(writer: ArchiveWriter, source: Path, staging_parent: Path) -> None:
    """The gateway's stored responses (``source``: its ``responses`` directory, one SQLite file), copied
    through SQLite's online backup API while the gateway writes, archived as ``responses/``."""
    if not source.is_dir():
        return
    with tempfile.TemporaryDirectory(prefix=".backup-responses-", dir=staging_parent) as staging:
        copy_rag_store(source, Path(staging) / "responses")  # any directory of SQLite files copies the same way
        if (Path(staging) / "responses").is_dir():
            writer.add_tree(Path(staging) / "responses", "responses")


def add_files_store(writer: ArchiveWriter, source: Path, staging_parent: Path) -> None:
    """The gateway's Files API store and its batches' run directories (``source``: its ``files`` directory),
    copied file by file while the gateway writes, archived as ``files/``. A run's output copied in the middle
    of an append ends in a torn line, which the runner cuts off and sends again when it resumes; dot files
    (locks, uploads not yet whole) are left out."""
    if not source.is_dir():
        return
    with tempfile.TemporaryDirectory(prefix=".backup-files-", dir=staging_parent) as staging:
        copy = Path(staging) / "files"
        for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")):
            target = copy / path.relative_to(source)
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile (a file, a finished run)
                shutil.copyfile(path, target)
        if copy.is_dir():
            writer.add_tree(copy, "files")


def add_models(writer: ArchiveWriter, models: list[Path], *, included: bool) -> None:
    """Every model file in the manifest with its sha256; the bytes themselves only when included."""
    for model in models:
        writer.manifest.models.append(
            {"path": model.name, "sha256": sha256_file(model), "size": model.stat().st_size, "included": included}
        )
        if included:
            writer.add_file(model, f"models/{model.name}")
