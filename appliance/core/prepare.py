"""`python -m appliance.core.prepare`: make sure the default model is on disk."""

from __future__ import annotations

import sys

from appliance.core.entry import load_or_exit
from appliance.core.model_files import prepare_default_model
from appliance.core.settings import CommonSettings


def main() -> int:
    settings = load_or_exit(CommonSettings, "prepare", configure_logs=False)
    path = prepare_default_model(settings.data_dir)
    sys.stderr.write(f"==> default model ready: {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
