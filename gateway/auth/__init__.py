"""Web sign-in: OpenID Connect (authorization code + PKCE), server-side sessions in Redis, users and their keys.

Modules: ``settings`` (the ``[auth]`` table), ``tokens`` (ID token checks), ``policy`` (claims to an identity
and a role), ``oidc`` (discovery, the authorization URL, the code exchange), ``sessions`` (pre-auth records and
sessions), ``users`` (user records and their keys), ``middleware`` (the session cookie as a credential).
Nothing is re-exported here: ``gateway.settings`` imports ``gateway.auth.settings`` and must not pull the rest.
"""
