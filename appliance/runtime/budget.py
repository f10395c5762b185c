"""The memory budget: what the models may use together, and the arithmetic shown when one does not fit.

A worker of a catalogue entry needs :func:`~appliance.core.model_catalogue.entry_bytes` (the GGUF's size
plus ``slots x n_ctx x kv_bytes_per_token``, the README's sizing rule). Resident entries cost that per
worker; the on_demand entries share swap hosts, each sized for the largest on_demand entry. The budget is
``[models] memory_budget``, else the memory this host has: the GPUs' total when a GPU is present, else RAM.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.core.model_catalogue import CatalogueEntry, entry_bytes

__all__ = ["Budget", "Fit", "fit", "host_memory", "human_bytes", "swap_host_bytes"]


def human_bytes(count: int) -> str:
    """``1.4 GiB``, ``253.1 MiB``, ``18.0 KiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop returns at GiB


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # "[models] memory_budget", "GPU memory (2 GPUs)", "host RAM"


def _gpu_total() -> tuple[int, int]:
    """(total bytes, GPUs) over every GPU NVML sees; (0, 0) without NVML or a GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # NVML missing or no driver: no GPU
        return 0, 0
    try:
        count = pynvml.nvmlDeviceGetCount()
        total = sum(int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total)
                    for i in range(count))
        return total, count
    except Exception:
        return 0, 0
    finally:
        pynvml.nvmlShutdown()


def _ram_total() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def host_memory(configured: int | None) -> Budget:
    """The configured budget, else the GPUs' memory when a GPU is present, else this host's RAM."""
    if configured:
        return Budget(configured, "[models] memory_budget")
    total, gpus = _gpu_total()
    if gpus:
        return Budget(total, f"GPU memory ({gpus} GPU{'s' if gpus > 1 else ''})")
    return Budget(_ram_total(), "host RAM")


def swap_host_bytes(entries: Sequence[CatalogueEntry]) -> int:
    """What one swap host needs: the largest on_demand entry (0 when there is none)."""
    return max((entry_bytes(e) for e in entries if e.resident == "on_demand"), default=0)


def _term(entry: CatalogueEntry) -> str:
    kv = entry.slots * entry.n_ctx * entry.kv_bytes_per_token
    return (f"{entry.alias}: {human_bytes(entry.size_bytes)} weights + {entry.slots} slots x {entry.n_ctx} tokens x "
            f"{human_bytes(entry.kv_bytes_per_token)} KV = {human_bytes(entry.size_bytes + kv)}")


@dataclass(frozen=True)
class Fit:
    """Whether the entries fit ``budget`` with ``swap_hosts`` swap hosts, and the arithmetic in words."""

    fits: bool
    used: int
    budget: Budget
    swap_hosts: int
    lines: tuple[str, ...]

    def message(self) -> str:
        verdict = "fits" if self.fits else "does not fit"
        return (f"{human_bytes(self.used)} {verdict} the memory budget of {human_bytes(self.budget.bytes)} "
                f"({self.budget.source}):\n" + "\n".join(f"  {line}" for line in self.lines))


def fit(entries: Sequence[CatalogueEntry], budget: Budget, swap_hosts: int | None = None) -> Fit:
    """Resident workers plus swap hosts against the budget. ``swap_hosts`` None: as many as fit after the
    resident entries, at most one per on_demand entry and at least one when there is any."""
    resident = [e for e in entries if e.resident == "always"]
    on_demand = [e for e in entries if e.resident == "on_demand"]
    lines = [f"{e.workers} worker{'s' if e.workers > 1 else ''} x ({_term(e)})" for e in resident]
    resident_bytes = sum(entry_bytes(e) * e.workers for e in resident)
    host = swap_host_bytes(on_demand)
    if swap_hosts is None:
        room = (budget.bytes - resident_bytes) // host if host else 0
        swap_hosts = min(len(on_demand), max(1, room)) if on_demand else 0
    if on_demand:
        largest = max(on_demand, key=entry_bytes)
        lines.append(f"{swap_hosts} swap host{'s' if swap_hosts != 1 else ''} x {human_bytes(host)} "
                     f"(the largest on_demand entry, {_term(largest)})")
        lines += [f"on_demand {_term(e)}" for e in on_demand if e is not largest]
    used = resident_bytes + swap_hosts * host
    lines.append(f"total {human_bytes(used)} of {human_bytes(budget.bytes)}")
    return Fit(used <= budget.bytes, used, budget, swap_hosts, tuple(lines))
