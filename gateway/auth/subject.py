"""A user's subject (the ``sub`` claim of the OpenID provider), parsed once into a typed value."""

from __future__ import annotations

from appliance.core.ids import Identifier

__all__ = ["UserSubject"]


class UserSubject(Identifier):
    """What providers use (UUIDs, numbers, base64url, ``auth0|abc``, ``f:uuid:name``): no ``/``, space or control."""

    __slots__ = ()
    rule = r"[A-Za-z0-9._~@:+=|-]{1,255}"
    described = "1-255 of letters, digits and '._~@:+=|-' (the provider's subject)"
    code = "invalid_subject"
