"""People who signed in with the OpenID provider, and the API key each one's requests run under.

A user record (``gw:user:<subject>``, subjects listed in ``gw:users``) keeps what the last sign-in said
(email, name, groups, the role they map to), whether an admin disabled the user, and the id of the user's
key. That key is an ordinary key of :class:`gateway.keys.KeyStore` (scopes from the role, limits from the
user's group at creation), so admission, limits, usage, collections and revocation work for people as for
programs. Its secret is never shown to anyone: it is ``HMAC-SHA256(server secret, salt)`` with a random
per-user salt, recomputed by the gateway for each request of a live session (Redis holds only its hash,
as for every key). An admin revoking the key ends the user's sessions; the next sign-in makes a new key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from appliance.core.ids import KeyId
from gateway.auth.policy import Identity, Refusal
from gateway.auth.settings import AuthSettings
from gateway.auth.subject import UserSubject
from gateway.keys import KEY_PREFIX, KeyLimits, KeyStore

__all__ = ["USERS", "UserRecord", "UserStore"]

USER = "gw:user:"
USERS = "gw:users"
_DERIVATION = b"appliance user key\0"


@dataclass(frozen=True, slots=True)
class UserRecord:
    subject: UserSubject
    email: str
    name: str
    role: str
    groups: tuple[str, ...]
    role_groups: tuple[str, ...]
    disabled: bool
    created_at: float
    last_sign_in: float
    key_id: str
    key_salt: str

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> UserRecord:
        return cls(subject=UserSubject.trusted(fields["subject"]), email=fields.get("email", ""),
                   name=fields.get("name", ""), role=fields.get("role", "user"),
                   groups=tuple(_list(fields.get("groups"))), role_groups=tuple(_list(fields.get("role_groups"))),
                   disabled=fields.get("disabled") == "1", created_at=float(fields.get("created_at") or 0),
                   last_sign_in=float(fields.get("last_sign_in") or 0), key_id=fields.get("key_id", ""),
                   key_salt=fields.get("key_salt", ""))

    def public_view(self) -> dict[str, Any]:
        """What an admin sees (no salt)."""
        return {"subject": str(self.subject), "email": self.email, "name": self.name, "role": self.role,
                "groups": list(self.groups), "role_groups": list(self.role_groups), "disabled": self.disabled,
                "created_at": self.created_at, "last_sign_in": self.last_sign_in or None,
                "key_id": self.key_id or None}


def _list(raw: str | None) -> list[str]:
    try:
        value = json.loads(raw or "[]")
    except ValueError:
        return []
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class UserStore:
    def __init__(self, redis: Redis, keys: KeyStore, settings: AuthSettings, *, default_limits: KeyLimits,
                 server_secret: str) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._default_limits = default_limits
        self._server_secret = server_secret.encode()

    def key_secret(self, user: UserRecord) -> str:
        """The user's key, recomputed (never stored): only this gateway, holding the server secret, can."""
        mac = hmac.new(self._server_secret, _DERIVATION + user.key_salt.encode(), hashlib.sha256).digest()
        return KEY_PREFIX + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    async def get(self, subject: UserSubject) -> UserRecord | None:
        fields = {_text(k): _text(v) for k, v in (await self._redis.hgetall(USER + subject) or {}).items()}
        return UserRecord.from_fields(fields) if fields.get("subject") == subject else None

    async def list(self) -> list[UserRecord]:
        subjects = sorted(_text(s) for s in await self._redis.smembers(USERS))
        if not subjects:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for subject in subjects:
                pipe.hgetall(USER + subject)
            raws = await pipe.execute()
        records = []
        for subject, raw in zip(subjects, raws, strict=True):
            fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
            if fields.get("subject") == subject and UserSubject.matches(subject):
                records.append(UserRecord.from_fields(fields))
        return records

    async def sign_in(self, identity: Identity) -> tuple[UserRecord, bool]:
        """Record this sign-in and make sure the user has a working key; (record, created). A disabled
        user is refused (:class:`Refusal` ``user_disabled``)."""
        existing = await self.get(identity.subject)
        if existing is not None and existing.disabled:
            raise Refusal("user_disabled", identity.subject)
        now = time.time()
        fields = {"subject": str(identity.subject), "email": identity.email, "name": identity.name,
                  "role": identity.role, "groups": json.dumps(list(identity.groups)),
                  "role_groups": json.dumps(list(identity.role_groups)), "last_sign_in": f"{now:.3f}"}
        if existing is None:
            fields.update({"disabled": "0", "created_at": f"{now:.3f}"})
        key_id, salt = await self._ensure_key(existing, identity)
        fields.update({"key_id": key_id, "key_salt": salt})
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(USER + identity.subject, mapping=dict[Any, Any](fields))
            pipe.sadd(USERS, str(identity.subject))
            await pipe.execute()
        record = await self.get(identity.subject)
        assert record is not None
        return record, existing is None

    def _scopes(self, identity: Identity) -> set[str]:
        return set(self._settings.user_scopes) | ({"admin"} if identity.role == "admin" else set())

    async def _ensure_key(self, existing: UserRecord | None, identity: Identity) -> tuple[str, str]:
        """The user's key (id, salt): the existing one with its scopes set from today's role, or a new one when
        there is none, it was revoked, or it no longer matches the server secret."""
        scopes = ",".join(sorted(self._scopes(identity)))
        if existing is not None and existing.key_id and existing.key_salt and KeyId.matches(existing.key_id):
            view = await self._keys.get(KeyId(existing.key_id))
            if view is not None and not view["revoked"] and await self._keys.exists(self.key_secret(existing)):
                await self._keys.update(KeyId(existing.key_id), {"scopes": scopes})
                return existing.key_id, existing.key_salt
        salt = secrets.token_hex(16)
        probe = UserRecord.from_fields({"subject": str(identity.subject), "key_salt": salt})
        group = self._settings.limits_for(list(identity.groups))
        base = self._default_limits
        limits = KeyLimits(rpm=base.rpm if group.rpm is None else group.rpm,
                           tpm=base.tpm if group.tpm is None else group.tpm,
                           tpd=base.tpd if group.tpd is None else group.tpd,
                           max_concurrent=base.max_concurrent if group.max_concurrent is None else group.max_concurrent)
        _, view = await self._keys.create(f"user:{identity.email or identity.subject}"[:100], self._scopes(identity),
                                          limits, secret=self.key_secret(probe))
        return str(view["id"]), salt

    async def set_disabled(self, subject: UserSubject, disabled: bool) -> UserRecord | None:
        if await self.get(subject) is None:
            return None
        await self._redis.hset(USER + subject, "disabled", "1" if disabled else "0")
        return await self.get(subject)
