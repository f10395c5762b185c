"""Under ``CI=true`` and ``./scripts/test`` (``APPLIANCE_TEST_STRICT=1``) a skip is a failure unless its reason
names the one part that cannot exist on a machine by installing packages: a GPU."""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["STRICT", "fail_strict_skip"]

STRICT = os.environ.get("CI", "").lower() == "true" or os.environ.get("APPLIANCE_TEST_STRICT") == "1"
_HARDWARE_REASON = re.compile(r"\b(GPU|CUDA|NVML)\b", re.IGNORECASE)


def fail_strict_skip(report: Any) -> None:
    """Turn a skipped test or collection ``report`` into a failure when strict and not for want of a GPU."""
    if not (STRICT and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not _HARDWARE_REASON.search(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped where a missing dependency is a failure (CI=true or ./scripts/test): {reason}"
