"""The offline install bundle: one tar with the images (`docker save`), the model files, the compose files
and their configuration, and a manifest of sha256 sums and sizes that `load` checks before it writes a
member (and again as it writes it) and before anything is used.

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
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from appliance import __version__
from appliance.core import strict_json
from appliance.core.model_files import sha256_file
from appliance.runtime.compose.engine import Engine, EngineError

__all__ = ["BUNDLE_FORMAT", "COMPOSE_FILES", "BundleResult", "load_bundle", "write_bundle"]

REPO = Path(__file__).resolve().parents[3]
BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
IMAGES = "images.tar"
MANIFEST_LIMIT = 16 << 20  # the manifest and SHA256SUMS are read whole: bounded
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
                manifest["files"][member] = {"sha256": sha256_file(path), "size": path.stat().st_size}
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


def _refuse(reason: str) -> EngineError:
    return EngineError(f"refusing the bundle: {reason}")


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    """A small member (the manifest, SHA256SUMS) read whole, bounded by ``limit``."""
    source = tar.extractfile(member)
    if source is None or member.size > limit:
        raise _refuse(f"{member.name} is unreadable or larger than {limit} bytes")
    return source.read()


def _parse_manifest(raw: bytes) -> dict[str, Any]:
    """The manifest, its format and the types of what later steps use checked."""
    try:
        # strict: a lone surrogate in an image name would crash the `docker` argv built from it
        manifest: dict[str, Any] = strict_json.loads(raw)
        for entry in manifest["files"].values():
            if not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int):
                raise TypeError(entry)
        for image in manifest["images"]:
            if not isinstance(image.get("name"), str) or not isinstance(image.get("id"), str):
                raise TypeError(image)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _refuse("no readable manifest.json") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise _refuse(f"format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}")
    return manifest


def _read_manifest(tar: tarfile.TarFile) -> tuple[dict[str, Any], list[tarfile.TarInfo]]:
    """The manifest and the members it lists, every member's shape and size checked; nothing written."""
    members = tar.getmembers()  # headers only: tarfile seeks over the data of an uncompressed tar
    by_name: dict[str, tarfile.TarInfo] = {}
    for member in members:
        if not member.isfile() or not _safe(member.name):
            raise _refuse(f"unexpected member {member.name!r}")
        if member.name in by_name:
            raise _refuse(f"the member {member.name!r} appears twice")
        by_name[member.name] = member
    if MANIFEST not in by_name:
        raise _refuse("no readable manifest.json")
    manifest = _parse_manifest(_member_bytes(tar, by_name[MANIFEST], MANIFEST_LIMIT))
    files: dict[str, dict[str, Any]] = manifest["files"]
    if SUMS in by_name and _member_bytes(tar, by_name[SUMS], MANIFEST_LIMIT) != _sums(files):
        raise _refuse(f"{SUMS} does not match the manifest")
    found = set(by_name) - {MANIFEST, SUMS}
    if found != set(files):
        raise _refuse(f"files {sorted(found ^ set(files))[:5]} do not match the manifest")
    for name in sorted(found):
        if by_name[name].size != files[name]["size"]:
            raise _refuse(f"{name} is {by_name[name].size} bytes, the manifest says {files[name]['size']}")
    return manifest, [by_name[name] for name in sorted(found)]


def _copy_hashed(tar: tarfile.TarFile, member: tarfile.TarInfo, sink: IO[bytes] | None) -> str:
    """Stream one member (into ``sink`` when given) in 1 MiB blocks; its sha256."""
    source = tar.extractfile(member)
    if source is None:
        raise _refuse(f"unreadable member {member.name!r}")
    digest = hashlib.sha256()
    with source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
            if sink is not None:
                sink.write(block)
    return digest.hexdigest()


def _extract_verified(archive: Path, staging: Path) -> dict[str, Any]:
    """Check every member's size, then its sha256, before writing any; then write them into ``staging``.

    One open file throughout. The first pass writes nothing; the second hashes each member again as it
    writes it (0600, in the caller's private staging folder), so a bundle changed on disk between the
    passes is refused too. The price is reading the bundle twice.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            manifest, members = _read_manifest(tar)
            files = manifest["files"]
            for member in members:
                if _copy_hashed(tar, member, None) != files[member.name]["sha256"]:
                    raise _refuse(f"{member.name} does not match its sha256 (corrupted or altered)")
            for member in members:
                target = staging / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    digest = _copy_hashed(tar, member, handle)
                if digest != files[member.name]["sha256"]:
                    raise _refuse(f"{member.name} changed while it was loaded")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _refuse(f"not a readable archive ({exc})") from None
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
