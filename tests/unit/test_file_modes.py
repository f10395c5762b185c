"""make_private: whatever the umask left, the data dir ends 0700/0600, symlinks untouched."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from appliance.core.files import make_private
from tests.support.file_modes import loose_paths


def test_a_tree_made_under_umask_0_ends_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    outside = tmp_path / "outside.txt"
    old = os.umask(0)
    try:
        (data / "rag" / "indexes").mkdir(parents=True)
        (data / "rag" / "store.sqlite3").write_text("x")
        (data / "logs").mkdir()
        (data / "logs" / "gateway.log").write_text("x")
        (data / "run").mkdir(mode=0o755)
        outside.write_text("not ours")
        (data / "link").symlink_to(outside)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(data / "run" / "s.sock"))
            assert loose_paths(data)  # 0777 dirs, 0666 files: everyone's
            assert make_private(data) >= 6
    finally:
        os.umask(old)
    assert loose_paths(data) == []
    assert outside.stat().st_mode & 0o777 == 0o666  # a symlink's target is not ours to change
    assert make_private(data) == 0  # nothing left to change
