"""Backup archives: create (with a manifest of SHA-256 sums), verify, extract, rotate."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance import __version__
from appliance.backup.manifest import MANIFEST_NAME, Manifest, ManifestError, sha256_bytes
from appliance.core.model_files import sha256_file

__all__ = ["ARCHIVE_GLOB", "ArchiveWriter", "copy_offsite", "extract_verified", "rotate", "verify_archive"]

ARCHIVE_GLOB = "appliance-backup-*.tar.gz"
Step = Callable[[str], None]


@dataclass
class ArchiveWriter:
    """Collects files into a staging archive; `finish` adds the manifest and renames into place."""

    directory: Path
    step: Step | None = None

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.path = self.directory / f"appliance-backup-{stamp}-{os.getpid()}.tar.gz"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".backup-", suffix=".partial")
        os.fchmod(fd, 0o600)  # archives carry key hashes and documents: owner only
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        # A fixed gzip header (no name, mtime 0) so verification can check every header byte too:
        # gzip's CRC covers the data, not the header.
        self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, mtime=0, compresslevel=6)
        self._tar = tarfile.open(fileobj=self._gzip, mode="w")  # noqa: SIM115 - closed in finish/abort
        self.manifest = Manifest(created=time.time(), appliance_version=__version__)

    def add_file(self, source: Path, member: str) -> None:
        self.manifest.add(member, sha256_file(source), source.stat().st_size)
        self._tar.add(source, arcname=member, recursive=False)
        if self.step:
            self.step(member)

    def add_tree(self, root: Path, prefix: str) -> None:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            self.add_file(path, f"{prefix}/{path.relative_to(root).as_posix()}")

    def finish(self) -> Path:
        raw = self.manifest.to_json()
        info = tarfile.TarInfo(MANIFEST_NAME)
        info.size, info.mtime, info.mode = len(raw), int(time.time()), 0o600
        self._tar.addfile(info, io.BytesIO(raw))
        self._tar.close()
        self._gzip.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._tar.close()
        self._gzip.close()
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def _safe_member(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


# magic, deflate, no flags, mtime 0, default-level XFL 0, OS unknown (255): what ArchiveWriter writes.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def _check_container(archive: Path) -> None:
    """Every byte of the file is covered: the fixed header here, the data and trailer by gzip's CRC."""
    try:
        with archive.open("rb") as raw:
            if raw.read(len(GZIP_HEADER)) != GZIP_HEADER:
                raise ManifestError("the archive's gzip header is not one this tool writes")
        with gzip.open(archive, "rb") as stream:
            while stream.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise ManifestError(f"the archive is damaged or truncated ({type(exc).__name__}: {exc})") from None


def verify_archive(archive: Path) -> Manifest:
    """Read the whole archive; raise ManifestError unless every byte and member match the manifest."""
    _check_container(archive)
    hashes: dict[str, tuple[str, int]] = {}
    manifest_raw: bytes | None = None
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                if not member.isfile() or not _safe_member(member.name):
                    raise ManifestError(f"unexpected member {member.name!r} (not a plain relative file)")
                handle = tar.extractfile(member)
                data = handle.read() if handle else b""
                if member.name == MANIFEST_NAME:
                    manifest_raw = data
                else:
                    hashes[member.name] = (sha256_bytes(data), len(data))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise ManifestError(f"the archive is damaged or truncated ({type(exc).__name__}: {exc})") from None
    if manifest_raw is None:
        raise ManifestError("the archive has no manifest")
    manifest = Manifest.from_json(manifest_raw)
    missing = sorted(set(manifest.files) - set(hashes))
    extra = sorted(set(hashes) - set(manifest.files))
    if missing or extra:
        raise ManifestError(f"members missing: {missing[:3]}, not in manifest: {extra[:3]}")
    for name, (digest, size) in hashes.items():
        if manifest.files[name]["sha256"] != digest or manifest.files[name].get("size") != size:
            raise ManifestError(f"{name} does not match its SHA-256 in the manifest")
    return manifest


def extract_verified(archive: Path, target: Path) -> Manifest:
    """Verify, then extract into ``target`` (which must be empty or absent)."""
    manifest = verify_archive(archive)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, mode="r:gz") as tar:
        tar.extractall(target, filter="data")
    return manifest


def rotate(directory: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest archives; returns what was removed."""
    archives = sorted(directory.glob(ARCHIVE_GLOB), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = archives[keep:] if keep > 0 else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def copy_offsite(archive: Path, directory: Path) -> Path:
    """Copy a verified archive to another disk, atomically, and check the copy."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{archive.name}.partial"
    shutil.copyfile(archive, tmp)
    os.chmod(tmp, 0o600)
    if sha256_file(tmp) != sha256_file(archive):
        tmp.unlink(missing_ok=True)
        raise ManifestError(f"the copy in {directory} does not match the archive")
    final = directory / archive.name
    tmp.replace(final)
    return final
