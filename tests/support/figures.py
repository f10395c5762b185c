"""Figures a chaos or fuzz test measured: printed, and written to ``artifacts/chaos/<name>.json``.

Pytest hides ``print`` unless ``-s``; the JSON file keeps the numbers whatever the flags,
and ``-ra`` summaries stay short. ``APPLIANCE_FIGURES_DIR`` moves the directory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def figures_dir() -> Path:
    return Path(os.environ.get("APPLIANCE_FIGURES_DIR") or REPO / "artifacts" / "chaos")


def record_figures(name: str, **figures: Any) -> Path:
    """Print ``name: k=v …`` (to the real stderr, past pytest's capture) and write them as JSON."""
    line = f"[figures] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    print(line)
    if sys.__stderr__ is not None:
        sys.__stderr__.write(line + "\n")
    target = figures_dir()
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"{name}.json"
    path.write_text(json.dumps({"name": name, "at": time.time(), **figures}, indent=2, default=str) + "\n")
    return path
