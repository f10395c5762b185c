"""The backup manifest: every member's SHA-256 and size, checked before anything is restored.

Format 2 (this one) names the key whose HMAC, in the member ``manifest.hmac``, covers the manifest's
exact bytes (see key.py). Format 1 archives carry no MAC: restore refuses them unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from appliance.core import strict_json

__all__ = ["FORMAT", "LEGACY_FORMAT", "MAC_NAME", "MANIFEST_LIMIT", "MANIFEST_NAME", "Manifest", "ManifestError",
           "sha256_bytes"]  # fmt: skip

MANIFEST_NAME = "manifest.json"
MAC_NAME = "manifest.hmac"
MANIFEST_LIMIT = 16 << 20  # read whole, so bounded: a million members' sums fit
FORMAT = 2
LEGACY_FORMAT = 1  # no MAC: restored only with --insecure-unsigned


class ManifestError(Exception):
    """The archive does not match its manifest; nothing may be restored from it."""


@dataclass
class Manifest:
    created: float
    appliance_version: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # member -> {sha256, size}
    models: list[dict[str, Any]] = field(default_factory=list)  # {path, sha256, size, included}
    redis_keys: int | None = None
    derived: list[dict[str, Any]] = field(default_factory=list)  # {path, files, bytes, recreated_by}: left out
    key_id: str | None = None  # the backup key whose MAC covers this manifest
    format: int = FORMAT
    audit_head: dict[str, Any] | None = None  # {seq, hash}: the audit log's head when the backup was taken
    authenticated: bool = field(default=False, compare=False)  # set by verification, never serialized

    def add(self, member: str, data_sha256: str, size: int) -> None:
        self.files[member] = {"sha256": data_sha256, "size": size}

    def to_json(self) -> bytes:
        body = {
            "format": self.format,
            "created": self.created,
            "appliance_version": self.appliance_version,
            "files": self.files,
            "models": self.models,
            "redis_keys": self.redis_keys,
            "derived": self.derived,
            "key_id": self.key_id,
            **({"audit_head": self.audit_head} if self.audit_head is not None else {}),
        }
        return json.dumps(body, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            body = strict_json.loads(raw)  # a lone surrogate in a name would crash the first print of it
            if body.get("format") not in (FORMAT, LEGACY_FORMAT):
                raise ManifestError(f"unknown manifest format {body.get('format')!r}")
            manifest = cls(
                float(body["created"]),
                str(body["appliance_version"]),
                dict(body["files"]),
                list(body["models"]),
                body.get("redis_keys"),
                list(body.get("derived", [])),
                body.get("key_id"),
                int(body["format"]),
                _audit_head(body.get("audit_head")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"the manifest is unreadable ({exc})") from None
        for member, entry in manifest.files.items():
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("sha256"), str)
                or not isinstance(entry.get("size"), int)
            ):
                raise ManifestError(f"the manifest entry for {member} is malformed")
        return manifest


def _audit_head(found: Any) -> dict[str, Any] | None:
    if found is None:
        return None
    if not isinstance(found, dict) or not isinstance(found.get("seq"), int) or not isinstance(found.get("hash"), str):
        raise ValueError("audit_head must be {seq, hash}")
    return {"seq": found["seq"], "hash": found["hash"]}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
