"""The `appliance` command: thin verbs over the runtime, backup and admin services."""

from __future__ import annotations

import subprocess
import sys
from typing import Annotated

import typer

from appliance.cli import admin, audit_cmds, backup_cmds, batches_cmds, bundle, images, models_cmds, stack, users_cmds
from appliance.cli.context import RuntimeFor, runtime

__all__ = ["create_app"]


def bench(
    name: Annotated[str, typer.Argument(help="which benchmark (see `appliance bench --list`)")] = "",
    args: Annotated[list[str] | None, typer.Argument(help="passed to the benchmark, e.g. --json")] = None,
    list_: Annotated[bool, typer.Option("--list", help="list the benchmarks")] = False,
) -> None:
    """Run a benchmark that measures side by side in one run and prints ratios."""
    # `python -m appliance.bench` in its own process: the product CLI imports no benchmark code.
    argv = ["--list"] if list_ or not name else [name, *(args or [])]
    result = subprocess.run([sys.executable, "-m", "appliance.bench", *argv], check=False)  # noqa: S603
    raise typer.Exit(result.returncode)


def create_app(runtime_for: RuntimeFor = runtime) -> typer.Typer:
    """The CLI; the stack verbs get their runtime from ``runtime_for`` (the one the settings name)."""
    app = typer.Typer(
        name="appliance", help="Run the LLM appliance: up, status, keys, backups, benchmarks.",
        no_args_is_help=True, add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"], "obj": runtime_for},
    )
    stack.register(app)
    images.register(app)
    bundle.register(app)
    backup_cmds.register(app)
    admin.register(app)
    audit_cmds.register(app)
    models_cmds.register(app)
    batches_cmds.register(app)
    users_cmds.register(app)
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(bench)
    return app
