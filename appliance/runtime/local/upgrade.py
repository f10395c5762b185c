"""`appliance upgrade`: every service on the newly installed code, without a gap in service.

Workers restart one at a time (rolling restart). The balancer and the gateway are each replaced by a
stand-in first: ``NAME-next`` starts on the same port (both bind with SO_REUSEPORT), takes connections
once it listens, the old process stops (it drains its in-flight requests), starts again on the new
code, and the stand-in stops (it drains too). The RAG service restarts in place (searches pause).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.runtime.local.rolling import rolling_restart
from appliance.runtime.plan import STANDBY_SUFFIX, Program
from appliance.runtime.protocol import RuntimeFailure

if TYPE_CHECKING:
    from appliance.runtime.local.runtime import LocalRuntime

__all__ = ["listens", "upgrade"]

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a listening TCP socket on ``port`` (Linux /proc)."""
    try:
        inodes = _socket_inodes(pid)
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == _LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                return True
    return False


def _port(program: Program) -> int:
    key = next(k for k in program.env if k.endswith("_PORT") and k.startswith(("APPLIANCE_GATEWAY", "APPLIANCE_BAL")))
    return int(program.env[key])


def _start_listening(runtime: LocalRuntime, program: Program) -> None:
    supervisor = runtime.supervisor
    runtime.progress(program.name, "starting", "")
    supervisor.start(program.name, wait=False)
    deadline = time.monotonic() + runtime.settings.ready_timeout_s
    port = _port(program)
    while True:
        info = supervisor.process(program.name)
        if info["statename"] == "RUNNING" and listens(int(info["pid"]), port):
            runtime.progress(program.name, "ready", f"listening on {port}")
            return
        if info["statename"] in {"EXITED", "FATAL", "BACKOFF"} or time.monotonic() > deadline:
            supervisor.stop(program.name)
            raise RuntimeFailure(f"{program.name} did not start listening on {port}; see its log in data/logs")
        time.sleep(0.2)


def _swap(runtime: LocalRuntime, plan: list[Program], name: str, reload_group: bool) -> None:
    program = next(p for p in plan if p.name == name)
    standby = next(p for p in plan if p.name == name + STANDBY_SUFFIX)
    _start_listening(runtime, standby)
    runtime.stop_together([name])  # drains its in-flight requests; the stand-in takes the new ones
    if reload_group:  # its new configuration applies as it starts again
        runtime.supervisor.remove_group(name)
        runtime.supervisor.add_group(name)
    _start_listening(runtime, program)
    runtime.stop_together([standby.name])
    runtime.wait_ready(program)


def upgrade(runtime: LocalRuntime, allow_outage: bool = False) -> list[str]:
    """Restart every service on the installed code, keeping the gateway answering throughout."""
    workers = rolling_restart(runtime, allow_outage=allow_outage)  # also applies changed worker settings
    plan = runtime.plan()
    runtime.write_files(plan)
    supervisor = runtime.supervisor
    added, changed, _removed = supervisor.reload_config()
    for name in (n for n in changed if n.endswith(STANDBY_SUFFIX)):  # stand-ins are stopped: reload them now
        supervisor.remove_group(name)
        supervisor.add_group(name)
    for name in (n for n in added if n.endswith(STANDBY_SUFFIX)):
        supervisor.add_group(name)
    done = list(workers)
    rag = next((p for p in plan if p.name == "rag"), None)
    if rag is not None:
        runtime.stop_together(["rag"])
        if "rag" in changed:
            supervisor.remove_group("rag")
            supervisor.add_group("rag")
        supervisor.start("rag", wait=False)
        runtime.wait_ready(rag)
        done.append("rag")
    for name in ("balancer", "gateway"):
        _swap(runtime, plan, name, reload_group=name in changed)
        done.append(name)
    runtime.start_missing()  # anything else whose configuration changed; a no-op otherwise
    return done
