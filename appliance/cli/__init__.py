"""The `appliance` admin CLI."""

from appliance.cli.app import create_app

__all__ = ["create_app", "main"]


def main() -> None:
    create_app()()
