"""The compose runtime's images, built with no registry: a local Debian base, a wheelhouse, the ONNX export.

* the base: ``debootstrap --variant=minbase bookworm`` (python3, venv, libgomp1) imported with
  ``docker import`` and reused while present;
* the wheelhouse: ``pip wheel`` on the host into ``.build/wheels``, pinned to the versions the host venv
  runs (so llama-cpp-python comes from pip's cache of the venv's own build: nothing compiles twice);
* the embedding model's ONNX graph, exported once on the host (torch is in the venv, never in an image);
* then one ``docker build`` per image; the engine's layer cache makes a warm rebuild quick.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.runtime.compose.engine import Engine, EngineError

__all__ = [
    "BASE_IMAGE",
    "DEBIAN_IMAGES",
    "PYTHON_IMAGES",
    "BuildReport",
    "build_images",
    "ensure_base_image",
    "image_name",
]

REPO = Path(__file__).resolve().parents[3]
BUILD_DIR = REPO / ".build"
BASE_IMAGE = "llm-appliance/debian-base:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "libgomp1", "ca-certificates")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# image -> Dockerfile of the CPU build (compose.yaml); compose.gpu.yaml swaps in the CUDA ones.
PYTHON_IMAGES: dict[str, str] = {
    "gateway": "docker/gateway.Dockerfile",
    "balancer": "docker/balancer.Dockerfile",
    "inference": "docker/inference.Dockerfile",
    "rag": "docker/rag.Dockerfile",
}
# image -> (Debian packages installed on the base by docker/debian-service.Dockerfile, paths trimmed after).
DEBIAN_IMAGES: dict[str, tuple[str, str]] = {
    "redis": ("redis-server", ""),
    "prometheus": ("prometheus", "/usr/share/javascript/moment-timezone/data"),
    "alertmanager": ("prometheus-alertmanager", ""),
    "node-exporter": ("prometheus-node-exporter", ""),
    "redis-exporter": ("prometheus-redis-exporter", ""),
}
_TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "var/lib/apt/lists", "var/cache/apt")
_POLICY_RC = "#!/bin/sh\n# No service starts while a package installs in an image build.\nexit 101\n"

Log = Callable[[str], None]


def image_name(name: str, prefix: str = "llm-appliance", version: str = "latest") -> str:
    return f"{prefix}/{name}:{version}"


@dataclass
class BuildReport:
    seconds: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


def _run(argv: list[str], what: str, log_file: Path | None = None, cwd: Path = REPO) -> None:
    """Run a build step; on failure the error names the step and shows the end of its output."""
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)  # noqa: S603
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise EngineError(f"{what} failed (exit {result.returncode}):\n{tail}")


def ensure_base_image(engine: Engine, log: Log, rebuild: bool = False) -> bool:
    """Make the local Debian base unless it is there; True when it was (re)made."""
    if not rebuild and engine.image_exists(BASE_IMAGE):
        return False
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise EngineError(
            "debootstrap is not installed (apt-get install debootstrap), or load the images "
            "from a bundle: `appliance bundle load ARCHIVE`"
        )
    log(f"making the base image {BASE_IMAGE} (debootstrap minbase bookworm, about 2 minutes)")
    with tempfile.TemporaryDirectory(prefix="appliance-base-") as tmp:
        root = Path(tmp) / "rootfs"
        _run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "bookworm",
                str(root),
                DEBIAN_MIRROR,
            ],
            "debootstrap",
        )
        for relative in _TRIM:
            for child in (root / relative).glob("*"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text(_POLICY_RC)
        policy.chmod(0o755)
        engine.import_rootfs(root, BASE_IMAGE)
    return True


def _constraints() -> str:
    """The host venv's exact versions (``pip freeze``), so images run what the tests ran."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    )
    return "\n".join(line for line in result.stdout.splitlines() if "==" in line and " @ " not in line) + "\n"


def _image_python(engine: Engine) -> str:
    result = engine.run(
        "run", "--rm", "--entrypoint", "python3", BASE_IMAGE, "-c", "import platform; print(platform.python_version())"
    )
    return result.stdout.strip()


def _wheel_python(engine: Engine, log: Log) -> str:
    """A Python like the image's for `pip wheel` (environment markers such as python_full_version < "3.11.3"
    must be evaluated for the image, not the host venv): the system python3 when its version matches."""
    wanted = _image_python(engine)
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system:
        version = subprocess.run(  # noqa: S603
            [system, "-c", "import platform; print(platform.python_version())"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if version == wanted:
            venv = BUILD_DIR / "wheel-venv"
            if not (venv / "bin" / "pip").is_file():
                _run([system, "-m", "venv", str(venv)], "python3 -m venv for the wheelhouse")
            return str(venv / "bin" / "python")
    log(f"no python {wanted} on the host: the wheelhouse is resolved with {sys.version.split()[0]}")
    return sys.executable


def _seed_cached_wheels(wheels: Path, constraints: str) -> None:
    """Copy pip's cached build of llama-cpp-python (the venv's own, same version) into the wheelhouse."""
    pins = dict(line.split("==", 1) for line in constraints.splitlines() if "==" in line)
    version = pins.get("llama_cpp_python") or pins.get("llama-cpp-python")
    cache = Path.home() / ".cache" / "pip" / "wheels"
    if version and cache.is_dir() and not any(wheels.glob(f"llama_cpp_python-{version}-*.whl")):
        for wheel in cache.rglob(f"llama_cpp_python-{version}-*.whl"):
            shutil.copy2(wheel, wheels / wheel.name)
            return


def ensure_wheelhouse(engine: Engine, log: Log) -> Path:
    """``.build/wheels`` for every CPU image; rebuilt only when the requirements or the pins change."""
    wheels = BUILD_DIR / "wheels"
    requirements, no_deps = (
        subprocess.run(  # noqa: S603
            [sys.executable, str(REPO / "docker/requirements.py"), option],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for option in ("--wheelhouse", "--wheelhouse-no-deps")
    )
    constraints = _constraints()
    stamp = hashlib.sha256((requirements + no_deps + constraints).encode()).hexdigest()
    stamp_file = BUILD_DIR / "wheels.stamp"
    if stamp_file.is_file() and stamp_file.read_text() == stamp and any(wheels.glob("*.whl")):
        return wheels
    log("filling the wheelhouse .build/wheels (pip wheel, pinned to the host venv)")
    shutil.rmtree(wheels, ignore_errors=True)  # no stale versions for `pip install --no-index` to prefer
    wheels.mkdir(parents=True)
    (BUILD_DIR / "requirements.txt").write_text(requirements)
    (BUILD_DIR / "constraints.txt").write_text(constraints)
    (wheels / "constraints.txt").write_text(constraints)  # the images install with the same pins
    _seed_cached_wheels(wheels, constraints)
    python = _wheel_python(engine, log)
    common = [
        python,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--wheel-dir",
        str(wheels),
        "--find-links",
        str(wheels),
        "-c",
        str(BUILD_DIR / "constraints.txt"),
    ]
    _run([*common, "-r", str(BUILD_DIR / "requirements.txt")], "pip wheel", BUILD_DIR / "logs" / "wheelhouse.log")
    _run([*common, "--no-deps", *no_deps.split()], "pip wheel --no-deps", BUILD_DIR / "logs" / "wheelhouse2.log")
    stamp_file.write_text(stamp)
    return wheels


def ensure_onnx_export(log: Log) -> Path:
    """``.build/onnx/encoder.onnx``: the bundled embedding model as one ONNX graph, exported on the host."""
    target = BUILD_DIR / "onnx" / "encoder.onnx"
    cache = BUILD_DIR / "onnx-cache"
    if not any(cache.glob(f"*/{target.name}")):
        log("exporting the embedding model to ONNX on the host (once)")
    # The RAG package's own command (``python -m rag.export``), not its internals: one JSON line on stdout.
    argv = [sys.executable, "-m", "rag.export", str(cache)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise EngineError(f"ONNX export of the embedding model failed (exit {result.returncode}):\n{tail}")
    exported = Path(json.loads(result.stdout)["encoder"])
    if not target.is_file() or target.stat().st_size != exported.stat().st_size:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(exported, target)
    return target


def build_images(
    engine: Engine, log: Log, prefix: str = "llm-appliance", version: str = "latest", only: list[str] | None = None
) -> BuildReport:
    """Every CPU image of compose.yaml (or ``only`` those), base and wheelhouse first."""
    report = BuildReport()
    started = time.monotonic()
    ensure_base_image(engine, log)
    report.seconds["base"] = round(time.monotonic() - started, 1)
    wanted = only or [*PYTHON_IMAGES, *DEBIAN_IMAGES]
    unknown = sorted(set(wanted) - set(PYTHON_IMAGES) - set(DEBIAN_IMAGES))
    if unknown:
        raise EngineError(
            f"unknown image(s) {', '.join(unknown)}; known: {', '.join([*PYTHON_IMAGES, *DEBIAN_IMAGES])}"
        )
    if any(name in PYTHON_IMAGES for name in wanted):
        started = time.monotonic()
        ensure_wheelhouse(engine, log)
        if "rag" in wanted:
            ensure_onnx_export(log)
        report.seconds["wheelhouse"] = round(time.monotonic() - started, 1)
    for name in wanted:
        tag = image_name(name, prefix, version)
        log(f"building {tag}")
        started = time.monotonic()
        if name in PYTHON_IMAGES:
            argv = ["build", "-f", PYTHON_IMAGES[name], "--build-arg", f"BASE={BASE_IMAGE}", "-t", tag, "."]
        else:
            packages, trim = DEBIAN_IMAGES[name]
            argv = [
                "build",
                "-f",
                "docker/debian-service.Dockerfile",
                "--build-arg",
                f"BASE={BASE_IMAGE}",
                "--build-arg",
                f"PACKAGES={packages}",
                "--build-arg",
                f"TRIM={trim}",
                "-t",
                tag,
                ".",
            ]
        _run(engine.docker_argv(*argv), f"docker build of {tag}", BUILD_DIR / "logs" / f"{name}.log")
        report.seconds[name] = round(time.monotonic() - started, 1)
        report.sizes[name] = engine.image_size(tag)
    return report
