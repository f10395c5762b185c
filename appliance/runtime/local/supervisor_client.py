"""A small typed client for supervisord's XML-RPC interface over its unix socket."""

from __future__ import annotations

import xmlrpc.client
from pathlib import Path
from typing import Any, cast

from supervisor.xmlrpc import SupervisorTransport

__all__ = ["ProcessInfo", "SupervisorClient", "SupervisorUnavailable"]

ProcessInfo = dict[str, Any]


class SupervisorUnavailable(Exception):
    """supervisord is not running (or its socket does not answer)."""


class SupervisorClient:
    def __init__(self, socket: Path) -> None:
        self._socket = socket
        transport = SupervisorTransport(None, None, f"unix://{socket}")
        self._proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def _call(self, method: str, *args: Any) -> Any:
        target: Any = self._proxy
        for part in method.split("."):
            target = getattr(target, part)
        try:
            return target(*args)
        except (OSError, xmlrpc.client.ProtocolError) as exc:
            raise SupervisorUnavailable(f"supervisord at {self._socket} does not answer ({exc})") from exc

    def alive(self) -> bool:
        if not self._socket.exists():
            return False
        try:
            return cast(str, self._call("supervisor.getState")["statename"]) == "RUNNING"
        except SupervisorUnavailable:
            return False

    def pid(self) -> int:
        return cast(int, self._call("supervisor.getPID"))

    def processes(self) -> list[ProcessInfo]:
        return cast(list[ProcessInfo], self._call("supervisor.getAllProcessInfo"))

    def process(self, name: str) -> ProcessInfo:
        return cast(ProcessInfo, self._call("supervisor.getProcessInfo", name))

    def reload_config(self) -> tuple[list[str], list[str], list[str]]:
        added, changed, removed = self._call("supervisor.reloadConfig")[0]
        return list(added), list(changed), list(removed)

    def add_group(self, name: str) -> None:
        self._call("supervisor.addProcessGroup", name)

    def remove_group(self, name: str) -> None:
        self._call("supervisor.removeProcessGroup", name)

    def start(self, name: str, wait: bool = False) -> None:
        try:
            self._call("supervisor.startProcess", name, wait)
        except xmlrpc.client.Fault as fault:
            if "ALREADY_STARTED" not in fault.faultString:
                raise

    def stop(self, name: str, wait: bool = True) -> None:
        try:
            self._call("supervisor.stopProcess", name, wait)
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString:
                raise

    def shutdown(self) -> None:
        self._call("supervisor.shutdown")
