from pathlib import Path

from scripts.check_forbidden import problems


def test_flags_each_banned_construct(tmp_path: Path) -> None:
    source = tmp_path / "bad.py"
    source.write_text(
        "import pickle, subprocess, yaml, jinja2, diskcache\n"
        "eval('1')\npickle.loads(b'')\nyaml.load('')\nsubprocess.run('ls', shell=True)\njinja2.Environment()\n"
        "diskcache.Cache('/tmp/c')\n"
    )
    found = problems(source)
    assert len(found) == 6
    assert any("shell=True" in line for line in found)


def test_sandboxed_jinja_is_allowed(tmp_path: Path) -> None:
    source = tmp_path / "ok.py"
    source.write_text("from jinja2.sandbox import ImmutableSandboxedEnvironment\nImmutableSandboxedEnvironment()\n")
    assert problems(source) == []
