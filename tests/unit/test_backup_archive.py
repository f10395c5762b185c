import gzip
import io
import tarfile
from pathlib import Path

import pytest

from appliance.backup.archive import ArchiveWriter, extract_verified, rotate, verify_archive
from appliance.backup.manifest import MANIFEST_NAME, Manifest, ManifestError, sha256_bytes
from appliance.backup.snapshot import copy_rag_store, record_derived


def _write_tar_gz(path: Path, members: dict[str, bytes]) -> None:
    """A tar.gz with the same fixed gzip header the appliance writes, so only the content differs."""
    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _archive(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    (source / "rag").mkdir(parents=True)
    (source / "rag" / "store.sqlite").write_bytes(b"documents" * 1000)
    (source / "rag" / "index.faiss").write_bytes(bytes(range(256)) * 50)
    writer = ArchiveWriter(tmp_path / "backups")
    writer.add_tree(source / "rag", "rag")
    return writer.finish()


def test_round_trip_restores_identical_files(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    assert archive.stat().st_mode & 0o777 == 0o600
    manifest = extract_verified(archive, tmp_path / "out")
    assert set(manifest.files) == {"rag/store.sqlite", "rag/index.faiss"}
    assert (tmp_path / "out" / "rag" / "store.sqlite").read_bytes() == b"documents" * 1000


def test_one_flipped_byte_anywhere_is_refused(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    raw = bytearray(archive.read_bytes())
    for position in (4, len(raw) // 3, len(raw) // 2, len(raw) - 20, len(raw) - 1):
        tampered = tmp_path / f"tampered-{position}.tar.gz"
        copy = bytearray(raw)
        copy[position] ^= 0x01
        tampered.write_bytes(bytes(copy))
        with pytest.raises(ManifestError):
            verify_archive(tampered)


def test_member_changed_with_valid_gzip_is_refused(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    members["rag/index.faiss"] = members["rag/index.faiss"][:-1] + b"X"
    forged = tmp_path / "forged.tar.gz"
    _write_tar_gz(forged, members)
    with pytest.raises(ManifestError, match=r"index\.faiss"):
        verify_archive(forged)


def test_truncated_and_manifestless_archives_are_refused(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    truncated = tmp_path / "short.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(ManifestError, match="damaged or truncated"):
        verify_archive(truncated)
    bare = tmp_path / "bare.tar.gz"
    _write_tar_gz(bare, {"rag/store.sqlite": b"documents"})
    with pytest.raises(ManifestError, match="no manifest"):
        verify_archive(bare)


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


def _forged(path: Path, evil: tarfile.TarInfo, data: bytes = b"x") -> Path:
    """A well-formed archive whose manifest vouches for one hostile member (so only its shape can refuse it)."""
    manifest = Manifest(created=0.0, appliance_version="test")
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
        info = tarfile.TarInfo(MANIFEST_NAME)
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
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
    ],
    ids=["dotdot-inside", "dotdot", "absolute", "symlink", "hardlink"],
)
def test_hostile_members_are_refused_before_anything_is_written(
    tmp_path: Path, member: tarfile.TarInfo, where: str
) -> None:
    archive = _forged(tmp_path / "forged.tar.gz", member)
    target = tmp_path / "restore" / "here"
    with pytest.raises(ManifestError, match="not a plain relative file"):
        extract_verified(archive, target)
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
