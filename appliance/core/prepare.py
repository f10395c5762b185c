"""`python -m appliance.core.prepare`: make sure the default model is on disk."""

from __future__ import annotations

import sys

from appliance.core.model_files import prepare_default_model
from appliance.core.settings import CommonSettings, ConfigError, load_settings


def main() -> int:
    try:
        settings = load_settings(CommonSettings)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    path = prepare_default_model(settings.data_dir)
    sys.stderr.write(f"==> default model ready: {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
