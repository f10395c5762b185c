"""Who may sign in and with which role, decided from a validated ID token's claims (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.auth.settings import AuthSettings
from gateway.auth.subject import UserSubject

__all__ = ["MAX_GROUPS", "Identity", "Refusal", "Role", "identity_from_claims"]

Role = Literal["user", "admin"]
MAX_GROUPS = 200  # a token listing more is cut here (stored per user, shown to admins)
_MAX_TEXT = 256


class Refusal(Exception):
    """This person may not sign in; ``reason`` is a short code (audit log, the sign-in page's message)."""

    def __init__(self, reason: str, subject: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.subject = subject  # the user's subject once known (a valid UserSubject), for the audit log


@dataclass(frozen=True, slots=True)
class Identity:
    subject: UserSubject
    email: str
    name: str
    groups: tuple[str, ...]
    role: Role
    role_groups: tuple[str, ...]  # the groups that made the role admin (empty for a user)


def _text(value: Any) -> str:
    return value.strip()[:_MAX_TEXT] if isinstance(value, str) else ""


def _groups(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    kept = [item[:_MAX_TEXT] for item in value if isinstance(item, str) and item]
    return tuple(dict.fromkeys(kept))[:MAX_GROUPS]


def identity_from_claims(claims: dict[str, Any], settings: AuthSettings) -> Identity:
    """The identity these claims sign in as, or :class:`Refusal` (``subject_unsupported``, ``email_domain``,
    ``email_unverified``, ``group``)."""
    raw_subject = claims.get("sub")
    if not UserSubject.matches(raw_subject):
        raise Refusal("subject_unsupported")
    subject = UserSubject(raw_subject)
    email = _text(claims.get("email")).lower()
    groups = _groups(claims.get(settings.groups_claim))
    admin_via = tuple(group for group in groups if group in settings.admin_groups)
    if settings.allowed_email_domains:
        domain = email.rpartition("@")[2] if "@" in email else ""
        if domain not in settings.allowed_email_domains:
            raise Refusal("email_domain", subject)
        if settings.require_verified_email and claims.get("email_verified") is not True:
            raise Refusal("email_unverified", subject)
    if settings.allowed_groups and not admin_via and not set(groups) & set(settings.allowed_groups):
        raise Refusal("group", subject)
    return Identity(subject=subject, email=email, name=_text(claims.get("name")) or email or str(subject),
                    groups=groups, role="admin" if admin_via else "user", role_groups=admin_via)
