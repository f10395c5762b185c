"""`appliance backup` and `appliance restore` over the local runtime's data directory."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from appliance.backup.archive import ArchiveWriter, copy_offsite, extract_verified, rotate, verify_archive
from appliance.backup.manifest import Manifest
from appliance.backup.snapshot import copy_rag_store, redis_bgsave
from appliance.core.model_files import sha256_file
from appliance.core.ports import free_port
from appliance.runtime.plan import find_redis_server
from appliance.runtime.settings import RuntimeSettings

__all__ = ["BackupResult", "RestoreResult", "create_backup", "restore_backup"]

Step = Callable[[str], None]


@dataclass
class BackupResult:
    archive: Path
    files: int
    bytes: int
    redis_keys: int | None
    rotated: list[Path] = field(default_factory=list)
    offsite: Path | None = None


@dataclass
class RestoreResult:
    archive: Path
    restored: list[str]
    models_missing: list[str]
    dry_run: bool


def _model_files(settings: RuntimeSettings) -> list[Path]:
    models = sorted((settings.data_dir / "models").glob("*.gguf"))
    if settings.model_path and settings.model_path.is_file() and settings.model_path not in models:
        models.append(settings.model_path)
    return models


def create_backup(settings: RuntimeSettings, to: Path | None = None, *, with_models: bool = False, keep: int = 7,
                  offsite: Path | None = None, step: Step | None = None) -> BackupResult:
    """A consistent snapshot while serving: Redis via BGSAVE, the RAG store, config, model manifest."""
    directory = to or settings.data_dir / "backups"
    client = redis.Redis(host="127.0.0.1", port=settings.redis_port, socket_timeout=10)
    writer = ArchiveWriter(directory, step)
    try:
        rdb, keys = redis_bgsave(client)
        writer.manifest.redis_keys = keys
        writer.add_file(rdb, "redis/dump.rdb")
        with tempfile.TemporaryDirectory(dir=settings.data_dir) as staging:
            copy_rag_store(settings.data_dir / "rag", Path(staging) / "rag")
            writer.add_tree(Path(staging) / "rag", "rag")
        for name in ("admin_key",):
            if (settings.data_dir / name).is_file():
                writer.add_file(settings.data_dir / name, f"secrets/{name}")
        if Path("appliance.toml").is_file():
            writer.add_file(Path("appliance.toml"), "config/appliance.toml")
        for model in _model_files(settings):
            writer.manifest.models.append({"path": model.name, "sha256": sha256_file(model),
                                           "size": model.stat().st_size, "included": with_models})
            if with_models:
                writer.add_file(model, f"models/{model.name}")
        archive = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        client.close()
    verify_archive(archive)
    result = BackupResult(archive, len(writer.manifest.files), archive.stat().st_size, keys)
    if offsite is not None:
        result.offsite = copy_offsite(archive, offsite)
        rotate(offsite, keep)
    result.rotated = rotate(directory, keep)
    return result


def _load_rdb_into_aof(redis_dir: Path) -> None:
    """Turn a restored dump.rdb into the AOF the runtime's Redis loads (AOF wins over RDB at start)."""
    port = free_port()
    argv = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
            "--appendonly", "no", "--save", ""]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        client.config_set("appendonly", "yes")
        while True:
            info = client.info("persistence")
            if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled") and \
                    info.get("aof_enabled"):
                break
            time.sleep(0.05)
        client.shutdown(save=True)
    finally:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _replace_dir(source: Path, target: Path) -> None:
    old = target.with_name(f"{target.name}.pre-restore")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    shutil.move(str(source), str(target))
    shutil.rmtree(old, ignore_errors=True)


def restore_backup(settings: RuntimeSettings, archive: Path, *, dry_run: bool = False,
                   stop: Callable[[list[str]], None] | None = None,
                   start: Callable[[], None] | None = None) -> RestoreResult:
    """Verify first; restore Redis, the RAG store and secrets; ``stop``/``start`` drive the runtime."""
    manifest: Manifest = verify_archive(archive)
    parts = sorted({name.split("/", 1)[0] for name in manifest.files})
    models_dir = settings.data_dir / "models"
    missing = [m["path"] for m in manifest.models
               if not m.get("included") and not (models_dir / m["path"]).is_file()]
    if dry_run:
        return RestoreResult(archive, parts, missing, True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.data_dir, prefix=".restore-") as tmp:
        staged = Path(tmp)
        extract_verified(archive, staged)
        if stop:
            stop(["gateway", "rag", "redis"])
        redis_dir = settings.data_dir / "redis"
        shutil.rmtree(redis_dir, ignore_errors=True)
        redis_dir.mkdir(parents=True)
        shutil.move(str(staged / "redis" / "dump.rdb"), str(redis_dir / "dump.rdb"))
        _load_rdb_into_aof(redis_dir)
        if (staged / "rag").is_dir():
            _replace_dir(staged / "rag", settings.data_dir / "rag")
        if (staged / "secrets" / "admin_key").is_file():
            shutil.copy2(staged / "secrets" / "admin_key", settings.data_dir / "admin_key")
            (settings.data_dir / "admin_key").chmod(0o600)
        if (staged / "models").is_dir():
            models_dir.mkdir(parents=True, exist_ok=True)
            for model in (staged / "models").iterdir():
                shutil.move(str(model), str(models_dir / model.name))
        if (staged / "config" / "appliance.toml").is_file():
            shutil.copy2(staged / "config" / "appliance.toml", settings.data_dir / "appliance.toml.restored")
    if start:
        start()
    return RestoreResult(archive, parts, missing, False)
