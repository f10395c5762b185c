"""`appliance backup` carries the Files and Batch APIs' data (data_dir/files: each key's files and the runs
of unfinished batches) and restore puts it back: real redis-server, ``create_backup`` and ``restore_backup``."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
import redis

from appliance.backup.restore import restore_backup
from appliance.backup.service import create_backup
from appliance.runtime.settings import RuntimeSettings
from tests.support.processes import redis_server

pytestmark = pytest.mark.integration

FILE = "files/key_0123abcd/file-00112233445566778899aabb"
RUN = "files/runs/batch_00112233445566778899aabb"


def _fill(data: Path) -> None:
    with redis_server(data / "redis") as (_, url):
        client = redis.Redis.from_url(url)
        client.set("gw:batch:batch_00112233445566778899aabb", "record")
        client.close()
    (data / FILE).parent.mkdir(parents=True)
    (data / FILE).write_bytes(b'{"custom_id": "a"}\n')
    (data / f"{FILE}.json").write_text('{"id": "file-00112233445566778899aabb"}')
    (data / FILE).with_name(".file-ffeeddccbbaa998877665544.part").write_bytes(b"half an upload")
    (data / RUN).mkdir(parents=True)
    (data / RUN / "output.jsonl").write_bytes(b'{"custom_id": "a"}\n{"custom_id": "b", "resp')  # mid-append
    (data / RUN / ".lock").write_bytes(b"")


def test_files_and_batch_runs_are_backed_up_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "empty.toml"))
    source = tmp_path / "source"
    _fill(source)
    with redis_server(source / "redis") as (_, url):
        if (source / "redis" / "run").is_dir():
            shutil.copytree(source / "redis" / "run", source / "run", dirs_exist_ok=True)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        archive = create_backup(RuntimeSettings(data_dir=source, redis_port=port), tmp_path / "backups").archive
    with tarfile.open(archive) as tar:
        members = set(tar.getnames())
    assert {FILE, f"{FILE}.json", f"{RUN}/output.jsonl"} <= members
    assert not any(name.rsplit("/", 1)[-1].startswith(".") for name in members if name.startswith("files/"))

    live = tmp_path / "live"
    (live / "run").mkdir(parents=True)
    shutil.copy2(source / "run" / "backup_key", live / "run" / "backup_key")
    result = restore_backup(RuntimeSettings(data_dir=live), archive)
    assert "files" in result.restored
    assert (live / FILE).read_bytes() == b'{"custom_id": "a"}\n'
    assert (live / RUN / "output.jsonl").read_bytes() == (source / RUN / "output.jsonl").read_bytes()
