"""Backup archives: a manifest of sums authenticated by the backup key, checked before anything is written.

The forgeries are written the way an attacker with write access to the backups would: with ``tarfile``
and ``hashlib``, not with the appliance's own writer.
"""

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from appliance.backup.archive import (
    ArchiveWriter,
    UnsignedArchiveError,
    extract_stream,
    extract_verified,
    rotate,
    verify_archive,
    verify_stream,
)
from appliance.backup.key import BackupKey, load_key, load_or_create_key
from appliance.backup.manifest import MAC_NAME, MANIFEST_NAME, Manifest, ManifestError, sha256_bytes
from appliance.backup.snapshot import copy_rag_store, record_derived
from tests.support.archives import write_tar_gz


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]


@pytest.fixture
def key(tmp_path: Path) -> BackupKey:
    return load_or_create_key(tmp_path / "data" / "run" / "backup_key")


def _archive(tmp_path: Path, key: BackupKey) -> Path:
    source = tmp_path / "src"
    (source / "rag").mkdir(parents=True)
    (source / "rag" / "store.sqlite").write_bytes(b"documents" * 1000)
    (source / "rag" / "index.faiss").write_bytes(bytes(range(256)) * 50)
    writer = ArchiveWriter(tmp_path / "backups", key)
    writer.add_tree(source / "rag", "rag")
    return writer.finish()


def test_the_key_is_generated_once_owner_only_and_kept_out_of_the_archive(tmp_path: Path, key: BackupKey) -> None:
    assert key.created and key.path.stat().st_mode & 0o777 == 0o600
    assert key.path.parent.stat().st_mode & 0o777 == 0o700
    again = load_or_create_key(key.path)
    assert not again.created and again.secret == key.secret and load_key(key.path).key_id == key.key_id
    archive = _archive(tmp_path, key)
    raw = gzip.decompress(archive.read_bytes())
    assert key.secret.hex().encode() not in raw and key.secret not in raw
    assert json.loads(_members(archive)[MANIFEST_NAME])["key_id"] == key.key_id
    assert key.secret.hex() not in repr(key)


def test_round_trip_restores_identical_files(tmp_path: Path, key: BackupKey) -> None:
    archive = _archive(tmp_path, key)
    assert archive.stat().st_mode & 0o777 == 0o600
    manifest = extract_verified(archive, tmp_path / "out", key)
    assert manifest.authenticated
    assert set(manifest.files) == {"rag/store.sqlite", "rag/index.faiss"}
    assert (tmp_path / "out" / "rag" / "store.sqlite").read_bytes() == b"documents" * 1000
    assert (tmp_path / "out" / "rag" / "store.sqlite").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out" / "rag").stat().st_mode & 0o777 == 0o700


def test_one_flipped_byte_anywhere_is_refused(tmp_path: Path, key: BackupKey) -> None:
    archive = _archive(tmp_path, key)
    raw = bytearray(archive.read_bytes())
    for position in (4, len(raw) // 3, len(raw) // 2, len(raw) - 20, len(raw) - 1):
        tampered = tmp_path / f"tampered-{position}.tar.gz"
        copy = bytearray(raw)
        copy[position] ^= 0x01
        tampered.write_bytes(bytes(copy))
        with pytest.raises(ManifestError):
            verify_archive(tampered, key)


def test_a_member_changed_after_signing_is_refused_though_the_mac_is_valid(tmp_path: Path, key: BackupKey) -> None:
    members = _members(_archive(tmp_path, key))
    members["rag/index.faiss"] = members["rag/index.faiss"][:-1] + b"X"  # manifest and its MAC left as signed
    forged = tmp_path / "forged.tar.gz"
    write_tar_gz(forged, members)
    with pytest.raises(ManifestError, match=r"index\.faiss does not match"):
        verify_archive(forged, key)
    with pytest.raises(ManifestError, match=r"index\.faiss does not match"):
        extract_verified(forged, tmp_path / "out", key)
    assert not (tmp_path / "out").exists()


def test_a_member_added_after_signing_is_refused(tmp_path: Path, key: BackupKey) -> None:
    members = _members(_archive(tmp_path, key))
    forged = tmp_path / "forged.tar.gz"
    write_tar_gz(forged, {"rag/planted.txt": b"planted", **members})
    with pytest.raises(ManifestError, match=r"not in manifest: \['rag/planted.txt'\]"):
        extract_verified(forged, tmp_path / "out", key)
    assert not (tmp_path / "out").exists()


def _repack(archive: Path, out: Path, how: str) -> Path:
    """The attack: change a member, rewrite its sum and size in the manifest, re-pack (no key at hand)."""
    members = _members(archive)
    members["rag/store.sqlite"] = b"planted by whoever can write the backups"
    manifest = json.loads(members[MANIFEST_NAME])
    data = members["rag/store.sqlite"]
    manifest["files"]["rag/store.sqlite"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    if how == "legacy-format":
        manifest["format"] = 1
        manifest.pop("key_id", None)
    members[MANIFEST_NAME] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    if how in ("mac-dropped", "legacy-format"):
        members.pop(MAC_NAME, None)
    if how == "mac-of-a-guessed-key":
        forger = BackupKey(Path("guess"), b"\0" * 32)
        members[MAC_NAME] = f"hmac-sha256 {forger.sign(members[MANIFEST_NAME])}\n".encode()
    write_tar_gz(out, members)
    return out


REPACKS = ["stale-mac", "mac-dropped", "mac-of-a-guessed-key", "legacy-format"]


@pytest.mark.parametrize("how", REPACKS)
def test_a_repacked_archive_with_valid_sums_is_refused_before_anything_is_written(
    tmp_path: Path, key: BackupKey, how: str
) -> None:
    forged = _repack(_archive(tmp_path, key), tmp_path / "forged.tar.gz", how)
    target = tmp_path / "out"
    with pytest.raises(ManifestError, match=r"MAC|manifest\.hmac|unsigned") as refused:
        extract_verified(forged, target, key)
    assert not target.exists()
    assert key.secret.hex() not in str(refused.value)
    assert isinstance(refused.value, UnsignedArchiveError) == (how == "legacy-format")
    if how != "legacy-format":  # --insecure-unsigned is for old archives only, never a current one whose MAC fails
        with pytest.raises(ManifestError, match=r"MAC|manifest\.hmac"):
            extract_verified(forged, target, key, allow_unsigned=True)
        assert not target.exists()


def test_another_hosts_key_is_named_and_its_own_key_restores(tmp_path: Path, key: BackupKey) -> None:
    archive = _archive(tmp_path, key)
    mine = load_or_create_key(tmp_path / "fresh-host" / "run" / "backup_key")
    with pytest.raises(ManifestError, match=f"key id {mine.key_id}; the manifest names '{key.key_id}'"):
        verify_archive(archive, mine)
    assert verify_archive(archive, load_key(key.path)).authenticated  # what --key FILE passes
    with pytest.raises(ManifestError, match=r"no backup key at .*pass --key FILE"):
        load_key(tmp_path / "nowhere" / "backup_key")


def _legacy(tmp_path: Path, members: dict[str, bytes]) -> Path:
    """A format-1 archive as the appliance wrote it before manifests were authenticated."""
    manifest = Manifest(created=0.0, appliance_version="old", format=1)
    for name, data in members.items():
        manifest.add(name, sha256_bytes(data), len(data))
    path = tmp_path / "legacy.tar.gz"
    write_tar_gz(path, {**members, MANIFEST_NAME: manifest.to_json()})
    return path


def test_a_legacy_unsigned_archive_needs_the_explicit_flag_and_still_has_its_sums_checked(
    tmp_path: Path, key: BackupKey
) -> None:
    legacy = _legacy(tmp_path, {"rag/store.sqlite": b"documents"})
    with pytest.raises(UnsignedArchiveError, match="--insecure-unsigned"):
        extract_verified(legacy, tmp_path / "out", key)
    assert not (tmp_path / "out").exists()

    def no_key_needed() -> BackupKey:
        raise AssertionError("a legacy archive has no MAC to check")

    manifest = extract_verified(legacy, tmp_path / "out", no_key_needed, allow_unsigned=True)
    assert not manifest.authenticated and (tmp_path / "out" / "rag" / "store.sqlite").read_bytes() == b"documents"
    members = _members(legacy)
    members["rag/store.sqlite"] = b"altered!!"
    write_tar_gz(tmp_path / "legacy-altered.tar.gz", members)
    with pytest.raises(ManifestError, match=r"store\.sqlite does not match"):
        verify_archive(tmp_path / "legacy-altered.tar.gz", key, allow_unsigned=True)


def test_a_lone_surrogate_in_a_manifest_is_a_refusal_not_a_crash(tmp_path: Path, key: BackupKey) -> None:
    """JSON may spell a lone surrogate ("\\ud800"): a manifest holding one is unreadable, and the refusal prints."""
    legacy = _legacy(tmp_path, {"rag/store.sqlite": b"documents"})
    members = _members(legacy)
    members[MANIFEST_NAME] = members[MANIFEST_NAME].replace(b"rag/store.sqlite", b"rag/\\ud800.sqlite")
    write_tar_gz(tmp_path / "surrogate.tar.gz", members)
    with pytest.raises(ManifestError, match="unreadable") as refused:
        verify_archive(tmp_path / "surrogate.tar.gz", key, allow_unsigned=True)
    str(refused.value).encode()  # the message itself encodes


def test_the_file_verified_is_the_file_extracted(tmp_path: Path, key: BackupKey) -> None:
    """Both passes read one open file: an archive renamed into its place in between is never read, and
    bytes changed in place in between are refused."""
    archive = _archive(tmp_path, key)
    original = archive.read_bytes()
    forged = _repack(archive, tmp_path / "forged.tar.gz", "stale-mac")
    with archive.open("rb") as handle:
        manifest = verify_stream(handle, key)
        os.replace(forged, archive)  # verify-then-reopen would now read the forgery
        extract_stream(handle, manifest, tmp_path / "out")
    assert (tmp_path / "out" / "rag" / "store.sqlite").read_bytes() == b"documents" * 1000

    archive.write_bytes(original)
    with archive.open("rb") as handle:
        manifest = verify_stream(handle, key)
        with archive.open("r+b") as writer:  # the same inode, changed under the open handle
            writer.seek(len(original) // 2)
            writer.write(b"\0" * 64)
        with pytest.raises(ManifestError):
            extract_stream(handle, manifest, tmp_path / "again")


def test_truncated_and_manifestless_archives_are_refused(tmp_path: Path, key: BackupKey) -> None:
    archive = _archive(tmp_path, key)
    truncated = tmp_path / "short.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(ManifestError, match="damaged or truncated"):
        verify_archive(truncated, key)
    bare = tmp_path / "bare.tar.gz"
    write_tar_gz(bare, {"rag/store.sqlite": b"documents"})
    with pytest.raises(ManifestError, match="no manifest"):
        verify_archive(bare, key)


def test_rotation_keeps_the_newest(tmp_path: Path) -> None:
    import os

    archives = []
    for age in range(4):
        path = tmp_path / f"appliance-backup-2026010{age}T000000Z-1.tar.gz"
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 - age * 100, 1_000_000 - age * 100))
        archives.append(path)
    removed = rotate(tmp_path, keep=2)
    assert sorted(removed) == sorted(archives[2:])
    assert all(p.exists() for p in archives[:2])


def _forged(path: Path, key: BackupKey, evil: tarfile.TarInfo, data: bytes = b"x") -> Path:
    """A well-formed archive whose signed manifest vouches for one hostile member (only its shape can refuse it)."""
    manifest = Manifest(created=0.0, appliance_version="test", key_id=key.key_id)
    manifest.add("rag/ok.txt", sha256_bytes(b"fine"), 4)
    manifest.add(evil.name, sha256_bytes(data), len(data))
    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        ok = tarfile.TarInfo("rag/ok.txt")
        ok.size = 4
        tar.addfile(ok, io.BytesIO(b"fine"))
        tar.addfile(evil, io.BytesIO(data) if evil.isfile() else None)
        body = manifest.to_json()
        for name, content in ((MANIFEST_NAME, body), (MAC_NAME, f"hmac-sha256 {key.sign(body)}\n".encode())):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, target, 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("member", "where"),
    [
        (_member("rag/../../escaped.txt"), "escaped.txt"),
        (_member("../escaped.txt"), "escaped.txt"),
        (_member("/tmp/appliance-restore-absolute.txt"), "/tmp/appliance-restore-absolute.txt"),
        (_member("rag/link", tarfile.SYMTYPE, "/etc/passwd"), "rag/link"),
        (_member("rag/hard", tarfile.LNKTYPE, "rag/ok.txt"), "rag/hard"),
        (_member("rag/./dot.txt"), "rag/dot.txt"),
        (_member("rag/fifo", tarfile.FIFOTYPE), "rag/fifo"),
    ],
    ids=["dotdot-inside", "dotdot", "absolute", "symlink", "hardlink", "dot", "fifo"],
)
def test_hostile_members_are_refused_before_anything_is_written(
    tmp_path: Path, key: BackupKey, member: tarfile.TarInfo, where: str
) -> None:
    archive = _forged(tmp_path / "forged.tar.gz", key, member)
    target = tmp_path / "restore" / "here"
    with pytest.raises(ManifestError, match="not a plain relative file"):
        extract_verified(archive, target, key)
    assert not target.exists()  # verification runs before extraction: not even the good member
    for place in (target / where, tmp_path / "restore" / where, tmp_path / where):  # an absolute `where` wins
        assert not place.exists(), place


def test_derived_files_are_left_out_and_named_in_the_manifest(tmp_path: Path) -> None:
    rag = tmp_path / "data" / "rag"
    (rag / "onnx" / "0123abcd").mkdir(parents=True)
    (rag / "onnx" / "0123abcd" / "encoder.onnx").write_bytes(b"\0" * 300_000)
    (rag / "store.sqlite").write_bytes(b"documents")
    copied = copy_rag_store(rag, tmp_path / "copy")
    assert [p.relative_to(tmp_path / "copy").as_posix() for p in copied] == ["store.sqlite"]
    manifest = Manifest(created=0.0, appliance_version="test")
    record_derived(manifest, rag, "rag")
    (entry,) = Manifest.from_json(manifest.to_json()).derived
    assert entry["path"] == "rag/onnx" and entry["bytes"] == 300_000 and entry["entries"] == ["0123abcd"]
    assert "embedding_model" in entry["recreated_by"]
