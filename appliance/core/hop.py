"""Header names of the internal hop (gateway -> balancer -> worker, gateway -> rag).

One home for each name. The caller's identity headers are set by the gateway
only, from the authenticated key (its id, never the key itself); the gateway
drops any client-sent copy before forwarding, and internal services trust them
only behind the internal token.
"""

from __future__ import annotations

__all__ = [
    "HOP_BY_HOP",
    "INTERNAL_TOKEN_HEADER",
    "KEY_ID_HEADER",
    "PRIORITY_HEADER",
    "QUEUE_WAIT_HEADER",
    "REQUEST_ID_HEADER",
    "WEIGHT_HEADER",
]

REQUEST_ID_HEADER = "X-Request-Id"
INTERNAL_TOKEN_HEADER = "X-Internal-Token"  # noqa: S105 - a header name, not a secret
# Who is asking: the API key's id (scopes prompt-prefix reuse, fair scheduling).
KEY_ID_HEADER = "X-Appliance-Key-Id"
# The key's priority class ("interactive" or "batch") after any self-lowering.
PRIORITY_HEADER = "X-Appliance-Priority"
# The key's fair-share weight (a positive number).
WEIGHT_HEADER = "X-Appliance-Weight"
# On an answer: seconds the request waited at the balancer for a slot (set only when it waited).
QUEUE_WAIT_HEADER = "X-Appliance-Queue-Wait"

# Lower-case names of the headers that describe one connection and its framing, never copied from one
# hop to the next (RFC 9110 7.6.1, plus Content-Length and Transfer-Encoding: each hop frames its own body).
HOP_BY_HOP: frozenset[str] = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "content-length",
})
