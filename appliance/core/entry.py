"""The shared prologue of every service entry point: settings parsed once, logging configured."""

from __future__ import annotations

import sys
from typing import TypeVar

from appliance.core.files import restrict_umask
from appliance.core.logging import configure_logging
from appliance.core.settings import CommonSettings, ConfigError, load_settings

__all__ = ["CONFIG_ERROR_EXIT", "load_or_exit"]

S = TypeVar("S", bound=CommonSettings)

# A configuration mistake exits with this status (supervisord and compose treat it as fatal, not as a crash to retry).
CONFIG_ERROR_EXIT = 2


def load_or_exit(cls: type[S], service: str, *, configure_logs: bool = True) -> S:
    """Parse ``cls`` from env/TOML, or explain the mistake on stderr and exit 2; then configure logging.

    First of all the umask becomes 077: whatever this service writes under the data dir is its user's alone."""
    restrict_umask()
    try:
        settings = load_settings(cls)
        settings.resolved_internal_token()  # a missing, empty or short token refuses to start here, exit 2
    except ConfigError as exc:
        sys.stderr.write(f"{service}: {exc}\n")  # logging is not configured yet
        raise SystemExit(CONFIG_ERROR_EXIT) from None
    if configure_logs:
        configure_logging(service, settings.log_level, settings.log_json)
    return settings
