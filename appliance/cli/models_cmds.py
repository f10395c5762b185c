"""`appliance models list|add|remove|pin|unpin`: the model catalogue of a running stack, changed live.

Thin verbs over :class:`appliance.runtime.protocol.Runtime`; each change is audited (``model.add``,
``model.remove``, ``model.pin``), a refused one too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from appliance.cli.audit_trail import record
from appliance.cli.context import RuntimeFor, load
from appliance.cli.output import err, fail, out, print_json
from appliance.core.model_settings import ModelConfig
from appliance.runtime.budget import human_bytes
from appliance.runtime.protocol import ModelChange, Runtime, RuntimeFailure

__all__ = ["register"]

models_app = typer.Typer(help="The models this appliance serves (several at once, swapped on demand).",
                         no_args_is_help=True)
RuntimeName = Annotated[str | None, typer.Option("--runtime", help="local (default) or compose")]


def _runtime(ctx: typer.Context, runtime_name: str | None) -> Runtime:
    runtime_for: RuntimeFor = ctx.find_root().obj
    return runtime_for(load(runtime=runtime_name))


@models_app.command("list")
def list_models(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False,
                runtime_name: RuntimeName = None) -> None:
    """Every model of the catalogue: resident or on demand, pinned, workers, state and memory."""
    try:
        rows = _runtime(ctx, runtime_name).models()
    except RuntimeFailure as exc:
        fail(escape(str(exc)))
    if as_json:
        print_json({"data": [asdict(row) for row in rows]})
        return
    table = Table("model", "resident", "pinned", "workers", "state", "memory", "serving on", title="models")
    for row in rows:
        table.add_row(row.alias, row.resident, "yes" if row.pinned else "-", str(row.workers or "swap hosts"),
                      row.state, human_bytes(row.memory_bytes), ", ".join(row.serving) or "-")
    out.print(table)


def _report(change: ModelChange, as_json: bool) -> None:
    if as_json:
        print_json(asdict(change))
        return
    err.print(f"[green]Model {change.alias} {change.action}[/] (workers started or moved: "
              f"{', '.join(change.started) or 'none'}; stopped after draining: {', '.join(change.stopped) or 'none'})")
    err.print(escape(change.budget), highlight=False)


def _apply(ctx: typer.Context, runtime_name: str | None, action: str, target: str,
           call: Callable[[Runtime], ModelChange], *, as_json: bool) -> None:
    rt = _runtime(ctx, runtime_name)
    try:
        change = call(rt)
    except RuntimeFailure as exc:
        record(rt.settings, action=action, target=target, outcome="refused", detail={"reason": str(exc)[:500]})
        fail(escape(str(exc)))
    record(rt.settings, action=action, target=target, detail={"change": change.action})
    _report(change, as_json)


@models_app.command("add")
def add(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="the GGUF file (as the workers see it)")],
    alias: Annotated[str, typer.Option("--alias", "--served-name", help="the model id clients send")],
    slots: Annotated[int | None, typer.Option(help="sequences per worker (default 8)")] = None,
    context: Annotated[int | None, typer.Option(help="context tokens per slot (default 8192)")] = None,
    workers: Annotated[int, typer.Option(help="dedicated workers (resident models)")] = 1,
    gpu: Annotated[list[int] | None, typer.Option("--gpu", help="a GPU its workers run on (repeatable)")] = None,
    on_demand: Annotated[bool, typer.Option("--on-demand", help="served by the shared swap hosts")] = False,
    pinned: Annotated[bool, typer.Option("--pin", help="on demand, never chosen for unload")] = False,
    allowed_sha256: Annotated[list[str] | None, typer.Option("--allowed-sha256", help="refuse any other file")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    runtime_name: RuntimeName = None,
) -> None:
    """Add a model to the running stack: checked (file, sha256, memory budget), then its workers start."""
    try:
        config = ModelConfig(alias=alias, path=path.resolve(), slots=slots, n_ctx=context, workers=workers,
                             gpus=gpu or [], resident="on_demand" if on_demand else "always", pinned=pinned,
                             allowed_sha256=allowed_sha256 or [])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'model'}: {e['msg']}" for e in exc.errors())
        fail(f"invalid model: {problems}", code=2)
    _apply(ctx, runtime_name, "model.add", alias, lambda rt: rt.add_model(config), as_json=as_json)


@models_app.command("remove")
def remove(ctx: typer.Context, alias: str, as_json: Annotated[bool, typer.Option("--json")] = False,
           runtime_name: RuntimeName = None) -> None:
    """Remove a model: its workers drain (running requests end normally), then its entry is deleted."""
    _apply(ctx, runtime_name, "model.remove", alias, lambda rt: rt.remove_model(alias), as_json=as_json)


@models_app.command("pin")
def pin(ctx: typer.Context, alias: str, as_json: Annotated[bool, typer.Option("--json")] = False,
        runtime_name: RuntimeName = None) -> None:
    """Pin an on_demand model: once loaded it is never chosen for unload."""
    _apply(ctx, runtime_name, "model.pin", alias, lambda rt: rt.pin_model(alias, True), as_json=as_json)


@models_app.command("unpin")
def unpin(ctx: typer.Context, alias: str, as_json: Annotated[bool, typer.Option("--json")] = False,
          runtime_name: RuntimeName = None) -> None:
    """Unpin an on_demand model."""
    _apply(ctx, runtime_name, "model.pin", alias, lambda rt: rt.pin_model(alias, False), as_json=as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
