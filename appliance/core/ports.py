"""A free loopback TCP port: for throwaway helper processes (benchmarks, tests, a backup's scratch Redis)."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (the OS picks it; bind soon, another process may too)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
