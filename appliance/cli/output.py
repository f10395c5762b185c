"""One place for CLI output: data to stdout, progress and messages to stderr, NO_COLOR honoured."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console

__all__ = ["data", "err", "fail", "out", "print_json"]

_no_color = bool(os.environ.get("NO_COLOR"))
out = Console(no_color=_no_color, soft_wrap=True)
err = Console(stderr=True, no_color=_no_color, soft_wrap=True)


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


def data(payload: Any, as_json: bool) -> None:
    if as_json:
        print_json(payload)
    else:
        out.print(payload)


def fail(message: str, code: int = 1) -> NoReturn:
    """Every failure is one clear sentence on stderr and a non-zero exit."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)
