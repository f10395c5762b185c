"""Which stack process ever talked beyond loopback: a thread sampling every process's sockets."""

from __future__ import annotations

import threading

import psutil

from tests.support.stack import LoopbackAppliance

__all__ = ["LOOPBACK", "ConnectionWatch"]

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


class ConnectionWatch(threading.Thread):
    """Samples every stack process's sockets every 0.1 s while the stack runs; keeps any non-loopback one."""

    def __init__(self, stack: LoopbackAppliance) -> None:
        super().__init__(daemon=True)
        self.stack, self.halt, self.outside, self.samples = stack, threading.Event(), set[str](), 0

    def run(self) -> None:
        while not self.halt.wait(0.1):
            self.samples += 1
            for name, service in list(self.stack.services.items()):
                try:
                    connections = psutil.Process(service.pid).net_connections(kind="inet")
                except psutil.Error:
                    continue
                for conn in connections:
                    if conn.raddr and conn.raddr.ip not in LOOPBACK:
                        self.outside.add(f"{name} -> {conn.raddr.ip}:{conn.raddr.port}")
                    if conn.status == psutil.CONN_LISTEN and conn.laddr.ip not in LOOPBACK:
                        self.outside.add(f"{name} listens on {conn.laddr.ip}:{conn.laddr.port}")
