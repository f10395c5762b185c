"""HTTPS: the operator's certificate and key, or a self-signed pair generated into ``data_dir/tls``.

The self-signed certificate covers the names it is asked for (the runtime passes this host's names,
its LAN address and ``tls_names``); it is generated again when that list changes.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

from appliance.core.settings import ConfigError

__all__ = ["resolve_tls", "self_signed_pair", "subject_alt_names"]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def subject_alt_names(names: list[str]) -> list[str]:
    """``DNS:``/``IP:`` entries for ``names`` plus localhost and 127.0.0.1, sorted and unique."""
    wanted = {n.strip() for n in [*names, "localhost", "127.0.0.1"] if n.strip()}
    return sorted(f"IP:{n}" if _is_ip(n) else f"DNS:{n}" for n in wanted)


def self_signed_pair(directory: Path, names: list[str]) -> tuple[Path, Path]:
    """Create a self-signed certificate for ``names`` with openssl (kept while the names stay the same)."""
    cert, key, record = directory / "gateway.crt", directory / "gateway.key", directory / "gateway.names"
    sans = subject_alt_names(names)
    if cert.is_file() and key.is_file() and record.is_file() and record.read_text().split() == sans:
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("tls_self_signed needs the 'openssl' command (Debian package openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    common = next((n for n in names if n and not _is_ip(n)), "localhost")
    argv = [
        openssl,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-days",
        "825",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-subj",
        f"/CN={common}",
        "-addext",
        "subjectAltName=" + ",".join(sans),
    ]
    old_umask = os.umask(0o077)
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)  # noqa: S603 - fixed argv, no shell
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"openssl failed: {exc.stderr.decode(errors='replace')[-300:]}") from exc
    finally:
        os.umask(old_umask)
    key.chmod(0o600)
    cert.chmod(0o600)  # public, yet nothing under data/ is for other users
    record.write_text("\n".join(sans) + "\n")
    return cert, key


def resolve_tls(
    cert: Path | None, key: Path | None, self_signed: bool, data_dir: Path, names: list[str]
) -> tuple[Path, Path] | None:
    """The certificate and key to serve with, or None for plain HTTP."""
    if cert or key:
        if not (cert and key and cert.is_file() and key.is_file()):
            raise ConfigError("tls_cert and tls_key must both name readable files")
        return cert, key
    if self_signed:
        return self_signed_pair(data_dir / "tls", names)
    return None
