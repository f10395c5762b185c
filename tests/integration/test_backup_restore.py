"""Restore is crash-safe: killed at every step, the data is wholly the old state or, once committed, the new one.

Real redis-server processes throughout. The "new" state is a real archive written by ``create_backup``
from a scratch Redis and data directory; the "old" state is a live data directory (Redis AOF, RAG store,
admin key) that differs in every part. A restore runs in its own process and SIGKILLs itself at one
milestone (``restore_backup``'s ``step``); then each part is read back, ``recover_interrupted_restore``
runs (as ``appliance up`` does before it starts Redis), and each part is read again.

The live data directory holds the backup key of the host that wrote the archive (``data/run/backup_key``,
as on that same host); forgeries of the archive are refused before a byte of the data directory changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from appliance.backup.archive import ArchiveWriter, verify_archive
from appliance.backup.key import load_key, load_or_create_key
from appliance.backup.manifest import MAC_NAME, MANIFEST_NAME, ManifestError
from appliance.backup.restore import RESTORE_DIR, recover_interrupted_restore, restore_backup
from appliance.backup.service import create_backup
from appliance.runtime.settings import RuntimeSettings
from tests.support.archives import write_tar_gz
from tests.support.processes import REPO, redis_server

pytestmark = pytest.mark.integration

ONNX_BYTES = 2_000_000  # stands in for the 90 MB export of the embedding model
STEPS_BEFORE_COMMIT = ["extracted", "staged"]
STEPS_AFTER_COMMIT = [
    "journal",
    "swap:redis:aside",
    "swap:redis:in",
    "swap:rag:aside",
    "swap:rag:in",
    "swap:admin_key:aside",
    "swap:admin_key:in",
    "committed",
]


def _settings(data_dir: Path, redis_port: int = 6379) -> RuntimeSettings:
    return RuntimeSettings(data_dir=data_dir, redis_port=redis_port)


def _fill(data_dir: Path, state: str) -> None:
    """A data directory whose Redis, RAG store and admin key all say ``state``."""
    with redis_server(data_dir / "redis") as (_, url):
        client = redis.Redis.from_url(url)
        client.set("state", state)
        client.mset({f"{state}:{i}": i for i in range(20)})
        client.set("ephemeral", "x", ex=3600)  # keys with a TTL may lapse; the persistent ones are compared
        client.close()
    (data_dir / "rag").mkdir(parents=True, exist_ok=True)
    (data_dir / "rag" / "state.txt").write_text(state)
    (data_dir / "rag" / "onnx" / f"fp-{state}").mkdir(parents=True)
    (data_dir / "rag" / "onnx" / f"fp-{state}" / "encoder.onnx").write_bytes(os.urandom(ONNX_BYTES))
    (data_dir / "admin_key").write_text(f"admin-{state}")


def _read(data_dir: Path) -> dict[str, str | None]:
    """What each part holds now, as a fresh Redis start would see it."""
    state: dict[str, str | None] = {"redis": None, "rag": None, "admin_key": None}
    if (data_dir / "redis").is_dir():
        with redis_server(data_dir / "redis") as (_, url):
            client = redis.Redis.from_url(url)
            value = client.get("state")
            state["redis"] = value.decode() if value else None
            client.close()
    if (data_dir / "rag" / "state.txt").is_file():
        state["rag"] = (data_dir / "rag" / "state.txt").read_text()
    if (data_dir / "admin_key").is_file():
        state["admin_key"] = (data_dir / "admin_key").read_text().removeprefix("admin-")
    return state


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("backup-source")
    (tmp / "empty.toml").write_text("")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("APPLIANCE_CONFIG", str(tmp / "empty.toml"))
        _fill(tmp / "data", "new")
        with redis_server(tmp / "data" / "redis") as (_, url):
            # The runtime's layout: its Redis users' passwords under data/run/redis (create_backup logs in as admin).
            if (tmp / "data" / "redis" / "run").is_dir():
                shutil.copytree(tmp / "data" / "redis" / "run", tmp / "data" / "run", dirs_exist_ok=True)
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            result = create_backup(_settings(tmp / "data", port), tmp / "backups")
    yield result.archive


def _key_of(archive: Path) -> Path:
    """The key the fixture's backup generated on its "host" (data/run/backup_key beside backups/)."""
    return archive.parents[1] / "data" / "run" / "backup_key"


def test_the_backup_leaves_the_onnx_export_out_and_says_what_recreates_it(archive: Path) -> None:
    key = load_key(_key_of(archive))
    assert key.path.stat().st_mode & 0o777 == 0o600
    manifest = verify_archive(archive, key)
    assert manifest.authenticated and manifest.key_id == key.key_id
    assert not [name for name in manifest.files if name.startswith("rag/onnx")]
    assert "rag/state.txt" in manifest.files and "redis/dump.rdb" in manifest.files
    (derived,) = manifest.derived
    assert derived["path"] == "rag/onnx" and derived["bytes"] == ONNX_BYTES and derived["entries"] == ["fp-new"]
    assert archive.stat().st_size < ONNX_BYTES / 10  # random bytes do not compress: they are not in it


def _restore_killed_at(data_dir: Path, archive: Path, step: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from appliance.backup.restore import restore_backup
        from appliance.runtime.settings import RuntimeSettings

        def step(name):
            if name == {step!r}:
                os.kill(os.getpid(), signal.SIGKILL)

        restore_backup(RuntimeSettings(data_dir=Path({str(data_dir)!r})), Path({str(archive)!r}), step=step)
        print("finished")
    """)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, archive: Path) -> Path:
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "empty.toml"))
    _fill(tmp_path / "data", "old")
    (tmp_path / "data" / "run").mkdir(mode=0o700)
    shutil.copy2(_key_of(archive), tmp_path / "data" / "run" / "backup_key")
    return tmp_path / "data"


OLD = {"redis": "old", "rag": "old", "admin_key": "old"}
NEW = {"redis": "new", "rag": "new", "admin_key": "new"}


@pytest.mark.parametrize("step", STEPS_BEFORE_COMMIT + STEPS_AFTER_COMMIT)
def test_restore_killed_at_each_step_leaves_old_or_new_never_a_mix(live: Path, archive: Path, step: str) -> None:
    killed = _restore_killed_at(live, archive, step)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stdout, killed.stderr[-2000:])
    assert (live / RESTORE_DIR).exists(), "killed mid-restore: its work directory is still there"
    if step in STEPS_BEFORE_COMMIT:
        assert _read(live) == OLD, "before the commit point the live data is untouched"
    recovered = recover_interrupted_restore(live)
    assert not (live / RESTORE_DIR).exists()
    if step in STEPS_BEFORE_COMMIT:
        assert recovered == [] and _read(live) == OLD
    else:
        # Killed at "committed": the journal was gone already, only the old parts were left to delete.
        assert recovered == ([] if step == "committed" else ["redis", "rag", "admin_key"])
        assert _read(live) == NEW
        # The derived export was carried over from the old store rather than left to be redone.
        assert (live / "rag" / "onnx" / "fp-old" / "encoder.onnx").stat().st_size == ONNX_BYTES
        assert (live / "admin_key").stat().st_mode & 0o777 == 0o600
    # And a restore after the crash runs to the end.
    finished = _restore_killed_at(live, archive, "never")
    assert finished.returncode == 0 and "finished" in finished.stdout, finished.stderr[-2000:]
    assert _read(live) == NEW and not (live / RESTORE_DIR).exists()


def test_a_restore_that_fails_its_checks_changes_nothing(live: Path, archive: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.tar.gz"
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    damaged.write_bytes(bytes(raw))
    result = _restore_killed_at(live, damaged, "never")
    assert result.returncode == 1 and "ManifestError" in result.stderr
    assert _read(live) == OLD and not (live / RESTORE_DIR).exists()


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under ``root``: mode, mtime and content (a directory's mtime moves when an entry comes or goes)."""
    state = {}
    for path in sorted([root, *root.rglob("*")]):
        info = path.lstat()
        if path.is_symlink():
            content = f"link:{os.readlink(path)}"
        elif path.is_dir():
            content = "dir"
        else:
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        state[path.relative_to(root).as_posix()] = (info.st_mode, info.st_mtime_ns, content)
    return state


def _repack(archive: Path, out: Path, how: str) -> Path:
    """The attacker's edit: an admin key of their own, its sum and size rewritten in the manifest, re-packed with
    every other member as it was (the MAC, if any, kept, dropped, or the manifest turned into the old format)."""
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    planted = b"admin-attacker"
    members["secrets/admin_key"] = planted
    manifest = json.loads(members[MANIFEST_NAME])
    manifest["files"]["secrets/admin_key"] = {"sha256": hashlib.sha256(planted).hexdigest(), "size": len(planted)}
    if how == "legacy-format":
        manifest["format"] = 1
    members[MANIFEST_NAME] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if how in ("mac-dropped", "legacy-format"):
        members.pop(MAC_NAME, None)
    return write_tar_gz(out, members)


@pytest.mark.parametrize("how", ["stale-mac", "mac-dropped", "legacy-format"])
def test_a_repacked_archive_with_valid_sums_is_refused_before_anything_is_written(
    live: Path, archive: Path, tmp_path: Path, how: str
) -> None:
    forged = _repack(archive, tmp_path / "forged.tar.gz", how)
    before = _snapshot(live)
    with pytest.raises(ManifestError, match=r"MAC|manifest\.hmac|unsigned"):
        restore_backup(_settings(live), forged)
    assert _snapshot(live) == before, "the data directory changed"
    assert not (live / RESTORE_DIR).exists()
    assert _read(live) == OLD


MEMBER_BYTES = 200 << 20


def test_restore_memory_stays_bounded_for_a_large_member(live: Path, tmp_path: Path) -> None:
    """A 200 MB member is hashed, checked and staged in blocks: the restore's peak RSS grows far less than that."""
    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        handle.truncate(MEMBER_BYTES)  # sparse: zeros read back, nothing written
    writer = ArchiveWriter(tmp_path / "big-backups", load_or_create_key(live / "run" / "backup_key"))
    writer.add_file(big, "rag/big.bin")
    large = writer.finish()
    script = textwrap.dedent(f"""
        from pathlib import Path
        from appliance.backup.restore import restore_backup
        from appliance.runtime.settings import RuntimeSettings

        def kib(field):
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

        settings = RuntimeSettings(data_dir=Path({str(live)!r}))
        with open("/proc/self/clear_refs", "w") as reset:
            reset.write("5")  # the peak (VmHWM) starts again from the current RSS
        before = kib("VmRSS:")
        restore_backup(settings, Path({str(large)!r}))
        print(before, kib("VmHWM:"))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before_kib, after_kib = map(int, done.stdout.split())
    growth = (after_kib - before_kib) * 1024
    print(f"peak RSS {before_kib // 1024} MiB before, {after_kib // 1024} MiB after: +{growth / 2**20:.1f} MiB")
    assert (live / "rag" / "big.bin").stat().st_size == MEMBER_BYTES
    assert growth < MEMBER_BYTES / 10, f"restoring a {MEMBER_BYTES >> 20} MiB member grew the peak RSS by {growth}"


def test_the_cli_refuses_a_forged_archive_and_says_why(live: Path, archive: Path, tmp_path: Path) -> None:
    forged = _repack(archive, tmp_path / "forged.tar.gz", "stale-mac")
    before = _snapshot(live)
    refused = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "restore", str(forged)],
        cwd=REPO,
        env={**os.environ, "APPLIANCE_DATA_DIR": str(live), "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1 and "Traceback" not in said, said
    assert "refusing to restore forged.tar.gz: the manifest's MAC does not verify with the backup key" in said, said
    # Nothing but the audit log changed, and it holds the refusal (the data dir's own mtime moves with audit/).
    audited = [json.loads(line) for line in (live / "audit" / "audit.jsonl").read_text().splitlines()]
    refusal = ("backup.restore", "forged.tar.gz", "refused")
    assert [(r["action"], r["target"], r["outcome"]) for r in audited] == [refusal]
    assert _outside_audit(_snapshot(live)) == _outside_audit(before)


def _outside_audit(state: dict[str, tuple[int, int, str]]) -> dict[str, tuple[int, int, str]]:
    return {path: entry for path, entry in state.items() if path != "." and path.split("/")[0] != "audit"}
