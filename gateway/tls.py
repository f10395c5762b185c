"""HTTPS: the operator's certificate and key, or a self-signed pair generated into ``data_dir/tls``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from appliance.core.settings import ConfigError

__all__ = ["resolve_tls", "self_signed_pair"]


def self_signed_pair(directory: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """Create (once) a self-signed certificate for ``hostname``, localhost and 127.0.0.1 with openssl."""
    cert, key = directory / "gateway.crt", directory / "gateway.key"
    if cert.is_file() and key.is_file():
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("tls_self_signed needs the 'openssl' command (Debian package openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    names = {f"DNS:{hostname}", "DNS:localhost", "IP:127.0.0.1"}
    argv = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "825",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={hostname}",
            "-addext", "subjectAltName=" + ",".join(sorted(names))]
    old_umask = os.umask(0o077)
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)  # noqa: S603 - fixed argv, no shell
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"openssl failed: {exc.stderr.decode(errors='replace')[-300:]}") from exc
    finally:
        os.umask(old_umask)
    key.chmod(0o600)
    return cert, key


def resolve_tls(cert: Path | None, key: Path | None, self_signed: bool, data_dir: Path,
                hostname: str) -> tuple[Path, Path] | None:
    """The certificate and key to serve with, or None for plain HTTP."""
    if cert or key:
        if not (cert and key and cert.is_file() and key.is_file()):
            raise ConfigError("tls_cert and tls_key must both name readable files")
        return cert, key
    if self_signed:
        return self_signed_pair(data_dir / "tls", hostname)
    return None
