"""`appliance backup` and `appliance restore` over the local runtime's data directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from appliance.backup.archive import ArchiveWriter, copy_offsite, rotate, verify_archive
from appliance.backup.restore import RestoreResult, recover_interrupted_restore, restore_backup
from appliance.backup.snapshot import add_models, add_rag_store, redis_bgsave
from appliance.runtime.settings import RuntimeSettings

__all__ = ["BackupResult", "RestoreResult", "create_backup", "recover_interrupted_restore", "restore_backup"]

Step = Callable[[str], None]


@dataclass
class BackupResult:
    archive: Path
    files: int
    bytes: int
    redis_keys: int | None
    rotated: list[Path] = field(default_factory=list)
    offsite: Path | None = None


def _model_files(settings: RuntimeSettings) -> list[Path]:
    models = sorted((settings.data_dir / "models").glob("*.gguf"))
    if settings.model_path and settings.model_path.is_file() and settings.model_path not in models:
        models.append(settings.model_path)
    return models


def create_backup(
    settings: RuntimeSettings,
    to: Path | None = None,
    *,
    with_models: bool = False,
    keep: int = 7,
    offsite: Path | None = None,
    step: Step | None = None,
) -> BackupResult:
    """A consistent snapshot while serving: Redis via BGSAVE, the RAG store, config, model manifest."""
    directory = to or settings.data_dir / "backups"
    client = redis.Redis(host="127.0.0.1", port=settings.redis_port, socket_timeout=10)
    writer = ArchiveWriter(directory, step)
    try:
        rdb, keys = redis_bgsave(client)
        writer.manifest.redis_keys = keys
        writer.add_file(rdb, "redis/dump.rdb")
        add_rag_store(writer, settings.data_dir)
        for name in ("admin_key",):
            if (settings.data_dir / name).is_file():
                writer.add_file(settings.data_dir / name, f"secrets/{name}")
        if Path("appliance.toml").is_file():
            writer.add_file(Path("appliance.toml"), "config/appliance.toml")
        add_models(writer, _model_files(settings), included=with_models)
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
