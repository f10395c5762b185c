"""Backup archives as an attacker (or a test) writes them: a tar.gz with the appliance's own gzip header."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

__all__ = ["write_tar_gz"]


def write_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
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
    return path
