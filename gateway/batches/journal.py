"""A running batch's progress on disk: ``<files_dir>/runs/<batch id>/`` holds ``input.jsonl`` (a hard link
to the uploaded file, so deleting the upload does not stop the batch), ``output.jsonl`` and
``errors.jsonl``, appended one OpenAI result line at a time and fsync'd before the line counts as done.

What is done is what these files hold: :meth:`RunJournal.recover` reads them back (cutting a torn last
line a crash left), so a restarted runner sends exactly the lines that are not in either file. The
directory is locked (``fcntl.flock``) by the process that writes it: two gateways never append to one
batch at once, and a dead process's lock goes with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from appliance.core.durable import fsync_path
from appliance.core.ids import BatchId

__all__ = ["Recovered", "RunJournal"]

OUTPUT, ERRORS, INPUT = "output.jsonl", "errors.jsonl", "input.jsonl"


@dataclass(slots=True)
class Recovered:
    """What the files already hold: the lines done, and the counts and tokens they add up to."""

    done: set[str] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, result: dict[str, Any], *, error: bool) -> None:
        self.done.add(str(result.get("custom_id")))
        if error:
            self.failed += 1
        else:
            self.completed += 1
        prompt, completion = result_tokens(result)
        self.prompt_tokens += prompt
        self.completion_tokens += completion


def result_tokens(result: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of a result line's answer (chat, completions, embeddings or Responses)."""
    response = result.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return (prompt if isinstance(prompt, int) else 0), (completion if isinstance(completion, int) else 0)


class RunJournal:
    """One batch's run directory. Blocking methods: call them in a thread."""

    def __init__(self, runs: Path, batch_id: BatchId) -> None:
        self.directory = runs / batch_id
        self._lock_fd: int | None = None
        self._fds: dict[str, int] = {}

    @property
    def input_path(self) -> Path:
        return self.directory / INPUT

    def output_path(self, *, error: bool) -> Path:
        return self.directory / (ERRORS if error else OUTPUT)

    def create(self, source: Path) -> None:
        """Make the directory with the input linked in (at batch creation)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.link(source, self.input_path)
        fsync_path(self.directory)

    def lock(self) -> bool:
        """Take the directory's lock without waiting; False when another process holds it."""
        fd = os.open(self.directory / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def recover(self) -> Recovered:
        """The results already written; a torn last line (no newline) is cut off first."""
        recovered = Recovered()
        for error in (False, True):
            path = self.output_path(error=error)
            if not path.exists():
                continue
            raw = path.read_bytes()
            whole = raw[: raw.rfind(b"\n") + 1]
            if len(whole) != len(raw):
                with path.open("r+b") as handle:
                    handle.truncate(len(whole))
                    os.fsync(handle.fileno())
            for text in whole.splitlines():
                with contextlib.suppress(msgspec.DecodeError):
                    result = msgspec.json.decode(text)
                    if isinstance(result, dict):
                        recovered.add(result, error=error)
        return recovered

    def append(self, line: bytes, *, error: bool) -> None:
        """Write one result line and fsync it: once this returns, the line is done."""
        name = ERRORS if error else OUTPUT
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.directory / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        view = memoryview(line)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
