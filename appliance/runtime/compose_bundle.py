"""The offline install bundle: one tar with the images (`docker save`), the model files, the compose files
and their configuration, and a manifest of sha256 sums that `load` checks before anything is used.

Layout of the archive (plain tar: the image layers are compressed already)::

    manifest.json              format, version, images (name + id), files (sha256, size)
    SHA256SUMS                 the same sums for `sha256sum -c` on a host without the appliance CLI
    images.tar                 `docker save` of every image, layers shared once
    models/NAME.gguf           the operator's own models from data/models (the default is in the image)
    compose/compose.yaml ...   compose.yaml, compose.gpu.yaml, .env.example, observability configuration
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from appliance import __version__
from appliance.runtime.compose_engine import Engine, EngineError

__all__ = ["BUNDLE_FORMAT", "COMPOSE_FILES", "BundleResult", "load_bundle", "write_bundle"]

REPO = Path(__file__).resolve().parents[2]
BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
IMAGES = "images.tar"
# What compose needs beside the images: the files and the configuration it mounts.
COMPOSE_FILES = (
    "compose.yaml",
    "compose.gpu.yaml",
    ".env.example",
    "observability/prometheus.yml",
    "observability/prometheus.cpu.yml",
    "observability/rules",
    "observability/alertmanager",
    "observability/grafana",
)

Log = Callable[[str], None]


@dataclass
class BundleResult:
    archive: Path
    bytes: int
    images: list[str]
    files: int
    seconds: float


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sums(files: dict[str, Any]) -> bytes:
    """``sha256sum``'s own format: what `sha256sum -c SHA256SUMS` checks in the extracted folder."""
    return "".join(f"{files[member]['sha256']}  {member}\n" for member in sorted(files)).encode()


def _add_bytes(tar: tarfile.TarFile, name: str, raw: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(raw), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(raw))


def _compose_members(root: Path) -> list[tuple[Path, str]]:
    members = []
    for name in COMPOSE_FILES:
        path = root / name
        if path.is_dir():
            members += [
                (p, f"compose/{p.relative_to(root).as_posix()}")
                for p in sorted(path.rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".py"
            ]
        elif path.is_file():
            members.append((path, f"compose/{name}"))
    return members


def write_bundle(engine: Engine, images: list[str], output: Path, models_dir: Path | None, log: Log) -> BundleResult:
    """Save ``images`` and the models into ``output`` (written under a temporary name, then renamed)."""
    started = time.monotonic()
    missing = [name for name in images if not engine.image_exists(name)]
    if missing:
        raise EngineError(f"images not built: {', '.join(missing)} (appliance images build)")
    output.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "appliance_version": __version__,
        "created": time.time(),
        "images": [],
        "files": {},
        "models": [],
    }
    for name in images:
        image_id = engine.run("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()
        manifest["images"].append({"name": name, "id": image_id})
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".bundle-") as tmp:
        saved = Path(tmp) / IMAGES
        log(f"docker save of {len(images)} images")
        engine.run("save", "-o", str(saved), *images)
        members = [(saved, IMAGES)]
        if models_dir is not None and models_dir.is_dir():
            for model in sorted(models_dir.glob("*.gguf")):
                members.append((model, f"models/{model.name}"))
                manifest["models"].append(model.name)
        members += _compose_members(REPO)
        partial = output.with_name(f".{output.name}.partial")
        with tarfile.open(partial, "w") as tar:
            for path, member in members:
                log(f"+ {member}")
                manifest["files"][member] = {"sha256": _sha256(path), "size": path.stat().st_size}
                tar.add(path, arcname=member, recursive=False)
            _add_bytes(tar, SUMS, _sums(manifest["files"]))
            _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        partial.replace(output)
    return BundleResult(
        output, output.stat().st_size, images, len(manifest["files"]), round(time.monotonic() - started, 1)
    )


def _safe(name: str) -> bool:
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and bool(path.parts)


def _extract_verified(archive: Path, staging: Path) -> dict[str, Any]:
    """Extract regular files only, then check every one against the manifest (and nothing extra or missing)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not member.isfile() or not _safe(member.name):
                    raise EngineError(f"refusing the bundle: unexpected member {member.name!r}")
                target = staging / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    raise EngineError(f"refusing the bundle: unreadable member {member.name!r}")
                with source, target.open("wb") as handle:
                    shutil.copyfileobj(source, handle, 1 << 20)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise EngineError(f"refusing the bundle: not a readable archive ({exc})") from None
    try:
        manifest: dict[str, Any] = json.loads((staging / MANIFEST).read_text())
    except (OSError, ValueError):
        raise EngineError("refusing the bundle: no readable manifest.json") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise EngineError(f"refusing the bundle: format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}")
    sums = staging / SUMS
    if sums.is_file() and sums.read_bytes() != _sums(manifest["files"]):
        raise EngineError(f"refusing the bundle: {SUMS} does not match the manifest")
    found = {p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()} - {MANIFEST, SUMS}
    listed = set(manifest["files"])
    if found != listed:
        raise EngineError(f"refusing the bundle: files {sorted(found ^ listed)[:5]} do not match the manifest")
    for member, expected in manifest["files"].items():
        if _sha256(staging / member) != expected["sha256"]:
            raise EngineError(f"refusing the bundle: {member} does not match its sha256 (corrupted or altered)")
    return manifest


def load_bundle(engine: Engine, archive: Path, target: Path, models_dir: Path, log: Log) -> dict[str, Any]:
    """Verify every byte, `docker load` the images and check their ids, then place compose files and models."""
    started = time.monotonic()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".bundle-load-") as tmp:
        staging = Path(tmp)
        log(f"verifying {archive.name}")
        manifest = _extract_verified(archive, staging)
        log("docker load")
        engine.run("load", "-i", str(staging / IMAGES))
        for image in manifest["images"]:
            loaded = engine.run("image", "inspect", "--format", "{{.Id}}", image["name"], check=False).stdout.strip()
            if loaded != image["id"]:
                raise EngineError(f"{image['name']} loaded as {loaded or 'nothing'}, the manifest says {image['id']}")
        placed = []
        for member in manifest["files"]:
            if member.startswith("compose/"):
                destination = target / member.removeprefix("compose/")
            elif member.startswith("models/"):
                destination = models_dir / member.removeprefix("models/")
            else:
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / member, destination)
            placed.append(str(destination))
    return {
        "images": [i["name"] for i in manifest["images"]],
        "placed": len(placed),
        "target": str(target),
        "models": manifest.get("models", []),
        "seconds": round(time.monotonic() - started, 1),
    }
