"""Backup archives: create (a manifest of SHA-256 sums, authenticated by the backup key), verify, extract.

Reading makes two passes over ONE open file, both streamed in 1 MiB blocks (no member is ever held
whole in memory). The first writes nothing: it hashes every member, then checks the manifest's MAC
with the backup key and every member against the manifest. The second (``seek(0)`` on the same
handle, so a file renamed into the archive's place between the passes is never read) writes each
member into the caller's staging directory and hashes it again on the way, so bytes changed on disk
between the passes are refused as well; the caller deletes the staging directory on any error.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import os
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from appliance import __version__
from appliance.backup.key import BackupKey
from appliance.backup.manifest import (
    LEGACY_FORMAT,
    MAC_NAME,
    MANIFEST_LIMIT,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
)
from appliance.core import strict_json
from appliance.core.model_files import sha256_file

__all__ = [
    "ARCHIVE_GLOB",
    "ArchiveWriter",
    "KeySource",
    "UnsignedArchiveError",
    "copy_offsite",
    "extract_stream",
    "extract_verified",
    "rotate",
    "verify_archive",
    "verify_stream",
]

ARCHIVE_GLOB = "appliance-backup-*.tar.gz"
CHUNK = 1 << 20
Step = Callable[[str], None]
# The key, or what loads it: loaded only when the archive needs one (a legacy archive does not).
KeySource = BackupKey | Callable[[], BackupKey]
_MAC_LINE = re.compile(rb"hmac-sha256 ([0-9a-f]{64})\n")


class UnsignedArchiveError(ManifestError):
    """A format-1 archive: sums but no MAC, so it cannot be told apart from a forged one."""


class _HashingReader:
    """A source file as tarfile reads it, hashed on the way: the manifest holds the sums of the bytes archived."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.digest.update(data)
        return data


@dataclass
class ArchiveWriter:
    """Collects files into a staging archive; `finish` adds the manifest and its MAC and renames into place."""

    directory: Path
    key: BackupKey
    step: Step | None = None

    def __post_init__(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
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
        with source.open("rb") as handle:
            info = self._tar.gettarinfo(arcname=member, fileobj=handle)
            info.mode, info.uid, info.gid, info.uname, info.gname = 0o600, 0, 0, "", ""
            reader = _HashingReader(handle)
            self._tar.addfile(info, reader)  # exactly info.size bytes, or OSError if the file shrank
        self.manifest.add(member, reader.digest.hexdigest(), info.size)
        if self.step:
            self.step(member)

    def add_tree(self, root: Path, prefix: str) -> None:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            self.add_file(path, f"{prefix}/{path.relative_to(root).as_posix()}")

    def add_bytes(self, member: str, raw: bytes) -> None:
        """A member taken from memory (a snapshot read under a lock), listed in the manifest like a file."""
        self._add_bytes(member, raw)
        self.manifest.add(member, hashlib.sha256(raw).hexdigest(), len(raw))
        if self.step:
            self.step(member)

    def _add_bytes(self, name: str, raw: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(raw), int(time.time()), 0o600
        self._tar.addfile(info, io.BytesIO(raw))

    def finish(self) -> Path:
        self.manifest.key_id = self.key.key_id
        raw = self.manifest.to_json()
        self._add_bytes(MANIFEST_NAME, raw)
        self._add_bytes(MAC_NAME, f"hmac-sha256 {self.key.sign(raw)}\n".encode())
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


def _plain_name(name: str) -> bool:
    """A relative path with no empty, ``.`` or ``..`` part: written where it says, and nowhere else."""
    return bool(name) and "\0" not in name and all(part not in ("", ".", "..") for part in name.split("/"))


# magic, deflate, no flags, mtime 0, default-level XFL 0, OS unknown (255): what ArchiveWriter writes.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _damaged(exc: BaseException) -> ManifestError:
    return ManifestError(f"the archive is damaged or truncated ({type(exc).__name__}: {exc})")


def _chunks(source: IO[bytes]) -> Iterator[bytes]:
    while True:
        try:
            block = source.read(CHUNK)
        except _READ_ERRORS as exc:
            raise _damaged(exc) from None
        if not block:
            return
        yield block


def _members(handle: BinaryIO) -> Iterator[tuple[tarfile.TarInfo, IO[bytes]]]:
    """Each member from the start of ``handle``, its shape checked; then the gzip stream read to its end.

    Every byte of the file is covered: the fixed header here, the data and trailer by gzip's CRC.
    """
    handle.seek(0)
    if handle.read(len(GZIP_HEADER)) != GZIP_HEADER:
        raise ManifestError("the archive's gzip header is not one this tool writes")
    handle.seek(0)
    seen: set[str] = set()
    try:
        with gzip.GzipFile(fileobj=handle, mode="rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile() or not _plain_name(member.name):
                    raise ManifestError(f"unexpected member {member.name!r} (not a plain relative file)")
                if member.name in seen:
                    raise ManifestError(f"the member {member.name!r} appears twice")
                seen.add(member.name)
                source = tar.extractfile(member)
                if source is None:  # a regular file always has a reader
                    raise ManifestError(f"unreadable member {member.name!r}")
                yield member, source
            while stream.read(CHUNK):
                pass
    except _READ_ERRORS as exc:
        raise _damaged(exc) from None


def _authenticate(manifest_raw: bytes | None, mac_raw: bytes | None, key: KeySource, allow_unsigned: bool) -> Manifest:
    """The manifest, parsed only once its MAC verifies (or, for a legacy archive, once the caller allowed it)."""
    if manifest_raw is None:
        raise ManifestError("the archive has no manifest")
    try:
        declared = strict_json.loads(manifest_raw)
        version, claimed_key = declared.get("format"), declared.get("key_id")
    except (ValueError, AttributeError):
        raise ManifestError("the manifest is unreadable") from None
    if version == LEGACY_FORMAT:
        if not allow_unsigned:
            raise UnsignedArchiveError(
                "the archive is in the old unsigned format (no manifest.hmac): whoever could write it could also "
                "have rewritten its sums, so it is refused. Restore it only if it never left storage you trust, "
                "with --insecure-unsigned"
            )
        return Manifest.from_json(manifest_raw)
    if mac_raw is None:
        raise ManifestError("the archive has no manifest.hmac: its manifest is not authenticated, so it is refused")
    match = _MAC_LINE.fullmatch(mac_raw)
    if match is None:
        raise ManifestError("the archive's manifest.hmac is malformed")
    backup_key = key if isinstance(key, BackupKey) else key()
    if not backup_key.verifies(manifest_raw, match.group(1).decode()):
        if claimed_key != backup_key.key_id:
            raise ManifestError(
                f"the manifest's MAC does not verify with the backup key {backup_key.path} (key id "
                f"{backup_key.key_id}; the manifest names {str(claimed_key)[:16]!r}): the archive was altered, or it "
                "was written by another host, whose data/run/backup_key you then pass with --key FILE"
            )
        raise ManifestError(
            f"the manifest's MAC does not verify with the backup key {backup_key.path}: the manifest was altered "
            "after it was written"
        )
    manifest = Manifest.from_json(manifest_raw)
    manifest.authenticated = True
    return manifest


def _matches(manifest: Manifest, name: str, digest: str, size: int) -> bool:
    expected = manifest.files.get(name)
    return (
        expected is not None
        and expected.get("size") == size
        and hmac.compare_digest(str(expected.get("sha256")), digest)
    )


def _hash(source: IO[bytes], sink: IO[bytes] | None = None) -> tuple[str, int]:
    """SHA-256 and size of a member, read in blocks (copied into ``sink`` on the way when given)."""
    digest, size = hashlib.sha256(), 0
    for block in _chunks(source):
        digest.update(block)
        size += len(block)
        if sink is not None:
            sink.write(block)
    return digest.hexdigest(), size


def verify_stream(handle: BinaryIO, key: KeySource, *, allow_unsigned: bool = False) -> Manifest:
    """First pass: read the whole archive, write nothing; raise ManifestError unless it is authentic and whole."""
    sums: dict[str, tuple[str, int]] = {}
    special: dict[str, bytes] = {}
    for member, source in _members(handle):
        if member.name in (MANIFEST_NAME, MAC_NAME):
            if member.size > MANIFEST_LIMIT:
                raise ManifestError(f"{member.name} is {member.size} bytes, more than a manifest can be")
            special[member.name] = b"".join(_chunks(source))
            continue
        sums[member.name] = _hash(source)
    manifest = _authenticate(special.get(MANIFEST_NAME), special.get(MAC_NAME), key, allow_unsigned)
    missing = sorted(set(manifest.files) - set(sums))
    extra = sorted(set(sums) - set(manifest.files))
    if missing or extra:
        raise ManifestError(f"members missing: {missing[:3]}, not in manifest: {extra[:3]}")
    for name, (digest, size) in sums.items():
        if not _matches(manifest, name, digest, size):
            raise ManifestError(f"{name} does not match its SHA-256 in the manifest")
    return manifest


def _private_dirs(root: Path, directory: Path) -> None:
    """``directory`` and every folder between it and ``root`` (which exists), created 0700."""
    for part in reversed([directory, *directory.parents]):
        if part == root or root not in part.parents:
            continue
        part.mkdir(mode=0o700, exist_ok=True)


def extract_stream(handle: BinaryIO, manifest: Manifest, target: Path) -> None:
    """Second pass over the verified ``handle``: every member into ``target`` (0700, files 0600), hashed again.

    A member that differs from what the first pass verified (the file changed on disk in between) raises
    ManifestError; the caller removes ``target``.
    """
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    written: set[str] = set()
    for member, source in _members(handle):
        if member.name in (MANIFEST_NAME, MAC_NAME):
            continue
        if member.name not in manifest.files or manifest.files[member.name].get("size") != member.size:
            raise ManifestError(f"{member.name!r} changed since the archive was verified")
        destination = target.joinpath(*member.name.split("/"))
        _private_dirs(target, destination.parent)
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            digest, size = _hash(source, out)
        if not _matches(manifest, member.name, digest, size):
            raise ManifestError(f"{member.name!r} changed since the archive was verified")
        written.add(member.name)
    if written != set(manifest.files):
        raise ManifestError("the archive changed since it was verified (members missing)")


def verify_archive(archive: Path, key: KeySource, *, allow_unsigned: bool = False) -> Manifest:
    """Read the whole archive; raise ManifestError unless its MAC and every member match."""
    with archive.open("rb") as handle:
        return verify_stream(handle, key, allow_unsigned=allow_unsigned)


def extract_verified(archive: Path, target: Path, key: KeySource, *, allow_unsigned: bool = False) -> Manifest:
    """Open once, verify (writing nothing), then extract into ``target`` from the same open file."""
    with archive.open("rb") as handle:
        manifest = verify_stream(handle, key, allow_unsigned=allow_unsigned)
        extract_stream(handle, manifest, target)
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
