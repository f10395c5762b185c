"""`appliance bundle` (write the offline install archive) and `appliance bundle load` (verify and load it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from appliance.cli.context import load, log
from appliance.cli.output import fail, out, print_json
from appliance.runtime.compose.bundle import load_bundle, write_bundle
from appliance.runtime.compose.engine import find_engine
from appliance.runtime.compose.images import BASE_IMAGE, DEBIAN_IMAGES, PYTHON_IMAGES, build_images, image_name
from appliance.runtime.protocol import RuntimeFailure

__all__ = ["bundle_app", "register"]

bundle_app = typer.Typer(
    help="Offline install bundle: images, models, compose files, sha256 manifest.", invoke_without_command=True
)


@bundle_app.callback()
def bundle(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="archive to write")] = Path("llm-appliance-bundle.tar"),
    models: Annotated[bool, typer.Option("--models/--no-models", help="include data/models/*.gguf")] = True,
    extra_image: Annotated[
        list[str] | None,
        typer.Option(
            "--image", help="another image to carry (repeatable), e.g. the CUDA builds and grafana for a GPU host"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Write one archive for an air-gapped host (builds the CPU images first if missing)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = load()
    try:
        engine = find_engine()
        images = [image_name(n) for n in [*PYTHON_IMAGES, *DEBIAN_IMAGES]]
        missing = [
            n
            for n, image in zip([*PYTHON_IMAGES, *DEBIAN_IMAGES], images, strict=True)
            if not engine.image_exists(image)
        ]
        if missing:
            build_images(engine, log, only=missing)
        result = write_bundle(
            engine,
            [*images, BASE_IMAGE, *(extra_image or [])],
            output,
            settings.data_dir / "models" if models else None,
            log,
        )
    except RuntimeFailure as exc:
        fail(str(exc))
    summary = {
        "archive": str(result.archive),
        "bytes": result.bytes,
        "images": result.images,
        "files": result.files,
        "seconds": result.seconds,
    }
    if as_json:
        print_json(summary)
        return
    out.print(
        f"Bundle written: {result.archive} ({result.bytes / 1e6:.0f} MB, {len(result.images)} images, "
        f"{result.files} files, {result.seconds} s)"
    )


@bundle_app.command("load")
def load_cmd(
    archive: Annotated[Path, typer.Argument(help="a bundle written by `appliance bundle`")],
    to: Annotated[Path, typer.Option("--to", help="where compose.yaml and its configuration go")] = Path("."),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Verify every file against the manifest, `docker load` the images, place compose files and models."""
    if not archive.is_file():
        fail(f"{archive} is not a file")
    try:
        # Models go where compose.yaml mounts them from by default (APPLIANCE_DATA_PATH=./data beside it).
        summary = load_bundle(find_engine(), archive, to, to / "data" / "models", log)
    except RuntimeFailure as exc:
        fail(str(exc))
    if as_json:
        print_json(summary)
        return
    out.print(
        f"Loaded {len(summary['images'])} images and {summary['placed']} files into {summary['target']} "
        f"in {summary['seconds']} s (every sha256 and image id checked). Next: "
        f"cd {summary['target']} && appliance up --runtime compose (or docker compose -p llm-appliance up -d)"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(bundle_app, name="bundle")
