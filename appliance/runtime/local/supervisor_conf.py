"""Render the supervisord configuration of the local stack (pure text, unit-tested)."""

from __future__ import annotations

import shlex
from pathlib import Path

from appliance.core.entry import CONFIG_ERROR_EXIT
from appliance.runtime.plan import Program

__all__ = ["render_supervisor_conf", "socket_path"]


def socket_path(run_dir: Path) -> Path:
    return run_dir / "supervisor.sock"


def _escape(value: str) -> str:
    # supervisord expands %(name)s in values; a literal % must be doubled.
    return value.replace("%", "%%")


def _env_line(env: dict[str, str]) -> str:
    for key, value in env.items():
        if '"' in value or "\n" in value:
            raise ValueError(f"environment value of {key} cannot contain quotes or newlines")
    return ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(env.items()))


def _program(program: Program, log_dir: Path, cwd: Path) -> str:
    command = " ".join(shlex.quote(part) for part in program.argv)
    return "\n".join(
        [
            f"[program:{program.name}]",
            f"command={_escape(command)}",
            f"directory={cwd}",
            f"environment={_env_line(program.env)}" if program.env else "",
            f"priority={program.priority}",
            "autostart=false",  # the CLI starts programs in dependency order and waits for each stage
            # A crash is restarted; exit status 2 is a configuration error (appliance.core.entry): restarting
            # cannot fix it, so it stays down (EXITED) and `appliance up` reports it at once.
            "autorestart=unexpected",
            f"exitcodes={CONFIG_ERROR_EXIT}",
            "startsecs=1",
            "startretries=3",
            "stopsignal=TERM",
            f"stopwaitsecs={program.stop_wait_s}",
            "stopasgroup=true",
            "killasgroup=true",
            "umask=077",  # what it writes under data/ (Redis AOF, Prometheus TSDB) is the user's alone
            "redirect_stderr=true",
            f"stdout_logfile={log_dir / (program.name + '.log')}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=5",
            "",
        ]
    )


def render_supervisor_conf(plan: list[Program], run_dir: Path, log_dir: Path, cwd: Path) -> str:
    sock = socket_path(run_dir)
    head = f"""; Written by `appliance up`; edits are overwritten.
[unix_http_server]
file={sock}
chmod=0700

[supervisord]
logfile={log_dir / "supervisord.log"}
pidfile={run_dir / "supervisord.pid"}
childlogdir={log_dir}
umask=077
nodaemon=false
silent=true

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{sock}

"""
    body = "\n".join(_program(program, log_dir, cwd) for program in plan)
    return head + body
