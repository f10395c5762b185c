"""The data dir is its owner's alone: directories 0700, files 0600, whatever umask the caller had.

Every process that writes under ``data/`` sets :data:`PRIVATE_UMASK` first: the services in
:func:`appliance.core.entry.load_or_exit`, the CLI in its ``main``, and supervisord hands it to its
children (Redis and Prometheus included). ``appliance up`` also tightens what an older version, a
copied model file or a restore left looser, with :func:`make_private`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["PRIVATE_UMASK", "make_private", "restrict_umask"]

PRIVATE_UMASK = 0o077
_OTHERS = 0o077  # group and other permission bits


def restrict_umask() -> None:
    """Files and directories this process creates from now on are for its user only."""
    os.umask(PRIVATE_UMASK)


def make_private(root: Path) -> int:
    """Drop every group/other permission under ``root`` (itself included); symlinks are left alone.

    Directories become 0700 and files keep only their owner bits (0600 for data). Returns how many
    paths changed. A path that vanishes meanwhile (a rotated log, a temporary file) is skipped.
    """
    if not root.is_dir() or root.is_symlink():
        return 0
    changed = _tighten(root, 0o700)
    for top, dirs, files in os.walk(root):  # symlinked directories are listed, not entered
        here = Path(top)
        changed += sum(_tighten(here / name, 0o700) for name in dirs)
        changed += sum(_tighten(here / name, None) for name in files)
    return changed


def _tighten(path: Path, wanted: int | None) -> int:
    try:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            return 0
        mode = stat.S_IMODE(info.st_mode)
        target = wanted if wanted is not None else mode & ~_OTHERS
        if mode == target:
            return 0
        path.chmod(target)
    except FileNotFoundError:
        return 0
    return 1
