"""What under a directory another user could read, write or enter (the data dir must show none)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["loose_paths"]


def loose_paths(root: Path) -> list[str]:
    """``"path mode"`` for every directory not 0700, file not 0600 and socket with a group/other bit
    under ``root`` (itself included; symlinks are not followed)."""
    found = []
    for path in [root, *root.rglob("*")]:
        try:
            info = path.lstat()
        except FileNotFoundError:  # a temporary file renamed meanwhile
            continue
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            continue
        if stat.S_ISDIR(info.st_mode):
            loose = mode != 0o700
        elif stat.S_ISSOCK(info.st_mode):
            loose = bool(mode & 0o077)
        else:
            loose = mode != 0o600
        if loose:
            found.append(f"{os.path.relpath(path, root)} {mode:o}")
    return found
