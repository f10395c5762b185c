"""`appliance bundle load` checks every member's size and sha256 against the manifest before it writes one.

The bundle is read from one open file: the manifest first, then each member's header size, then each
member's bytes hashed (nothing written), and only then the members written into the private staging
folder (hashed again on the way). A bundle that fails a check leaves the staging folder empty.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from appliance.runtime.compose.bundle import _extract_verified, load_bundle
from appliance.runtime.compose.engine import EngineError
from tests.support.compose_engine import FakeEngine, make_bundle, rewrite_bundle


def _changed(archive: Path, tamper: str) -> Path:
    def change(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if name != "models/mine.gguf":
            return [(name, data)]
        if tamper == "same-size-other-bytes":
            return [(name, data[:-1] + bytes([data[-1] ^ 1]))]
        return [(name, data + b"+ one byte the manifest does not count")]

    return rewrite_bundle(archive, change)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("same-size-other-bytes", r"models/mine\.gguf does not match its sha256"),
        ("longer", r"models/mine\.gguf is \d+ bytes, the manifest says \d+"),
    ],
)
def test_a_member_whose_size_or_hash_differs_is_refused_before_any_member_is_written(
    tmp_path: Path, tamper: str, reason: str
) -> None:
    _, archive = make_bundle(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(EngineError, match=f"refusing the bundle: {reason}"):
        _extract_verified(_changed(archive, tamper), staging)
    assert list(staging.rglob("*")) == []  # not images.tar, not the compose files: nothing


def test_a_manifest_that_is_not_one_is_refused_cleanly(tmp_path: Path) -> None:
    _, archive = make_bundle(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()

    def change(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest["files"]["models/mine.gguf"]["size"] = "many"
            return [(name, json.dumps(manifest).encode())]
        return [(name, data)]

    with pytest.raises(EngineError, match=r"no readable manifest\.json"):
        _extract_verified(rewrite_bundle(archive, change), staging)
    assert list(staging.rglob("*")) == []


def test_a_verified_bundle_is_written_owner_only(tmp_path: Path) -> None:
    _, archive = make_bundle(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    manifest = _extract_verified(archive, staging)
    written = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    assert written == sorted(manifest["files"])
    assert {p.stat().st_mode & 0o777 for p in staging.rglob("*") if p.is_file()} == {0o600}
    with tarfile.open(archive) as tar:
        model = tar.extractfile("models/mine.gguf")
        assert model is not None and (staging / "models" / "mine.gguf").read_bytes() == model.read()


def test_a_lone_surrogate_in_the_manifest_is_refused_before_docker_load(tmp_path: Path) -> None:
    """JSON may spell a lone surrogate ("\\ud800"); as an image name it would crash the `docker` argv built
    from it (UnicodeEncodeError, a traceback) instead of a refusal."""
    _, archive = make_bundle(tmp_path)

    def change(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if name == "manifest.json":
            manifest = json.loads(data)
            manifest["images"][0]["name"] = "app/one\ud800:1"
            return [(name, json.dumps(manifest).encode())]
        return [(name, data)]

    fresh = FakeEngine()
    with pytest.raises(EngineError, match=r"no readable manifest\.json"):
        load_bundle(fresh, rewrite_bundle(archive, change), tmp_path / "site", tmp_path / "site" / "models", print)
    assert not any(call[0] == "load" for call in fresh.calls)  # type: ignore[attr-defined]
