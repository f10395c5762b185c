"""`appliance images`: the compose runtime's images, built locally with no registry."""

from __future__ import annotations

from typing import Annotated

import typer

from appliance.cli.context import log
from appliance.cli.output import fail, out, print_json
from appliance.runtime.compose.engine import find_engine
from appliance.runtime.compose.images import build_images
from appliance.runtime.protocol import RuntimeFailure

__all__ = ["images_app", "register"]

images_app = typer.Typer(help="The compose runtime's images (built locally, no registry).", no_args_is_help=True)


@images_app.command("build")
def images_build(
    only: Annotated[list[str] | None, typer.Argument(help="images to build (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Build the CPU images: local Debian base (debootstrap), wheelhouse, then one docker build each."""
    try:
        report = build_images(find_engine(), log, only=list(only or []) or None)
    except RuntimeFailure as exc:
        fail(str(exc))
    sizes_mb = {name: round(size / 1e6) for name, size in report.sizes.items()}
    if as_json:
        print_json({"seconds": report.seconds, "sizes_mb": sizes_mb})
        return
    for name, size in sizes_mb.items():
        out.print(f"  {name:<15} {size:>5} MB  built in {report.seconds.get(name)} s")


def register(app: typer.Typer) -> None:
    app.add_typer(images_app, name="images")
