"""The AST ban list (scripts/check_forbidden.py) catches each construct, and the packages are clean."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.check_forbidden import main, problems

BAD = {
    "yaml.unsafe_load('')": "yaml.unsafe_load",
    "yaml.full_load('')": "yaml.full_load",
    "pickle.Unpickler(f).load()": "pickle.Unpickler",
    "marshal.load(f)": "marshal.load",
    "shelve.open('x')": "shelve.open",
    "os.popen('ls')": "os.popen",
    "torch.load('m.pt')": "weights_only",
    "torch.load('m.pt', weights_only=False)": "weights_only",
    "np.load('a.npy', allow_pickle=True)": "allow_pickle",
    "tar.extractall('/tmp/x')": "extractall",
    "subprocess.Popen('ls', shell=True)": "shell=True",
}
GOOD = [
    "torch.load('m.pt', weights_only=True)",
    "np.load('a.npy')",
    "tar.extractall('/tmp/x', filter='data')",
    "yaml.safe_load('')",
    "subprocess.run(['ls'], check=True)",
]


@pytest.mark.parametrize("line", list(BAD))
def test_each_banned_construct_is_flagged(tmp_path: Path, line: str) -> None:
    source = tmp_path / "bad.py"
    source.write_text(f"import os, pickle, marshal, shelve, subprocess, torch, yaml\nimport numpy as np\n{line}\n")
    found = problems(source)
    assert len(found) == 1 and BAD[line] in found[0], found


@pytest.mark.parametrize("line", GOOD)
def test_safe_forms_pass(tmp_path: Path, line: str) -> None:
    source = tmp_path / "ok.py"
    source.write_text(f"import subprocess, torch, yaml\nimport numpy as np\n{line}\n")
    assert problems(source) == []


def test_the_packages_are_clean() -> None:
    assert main() == 0
