"""The `appliance` admin CLI."""

from appliance.cli.app import create_app
from appliance.core.files import restrict_umask

__all__ = ["create_app", "main"]


def main() -> None:
    restrict_umask()  # what the CLI writes under data/ (and supervisord, which it starts) is the user's alone
    create_app()()
