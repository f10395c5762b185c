"""What the `appliance` stack verbs ask of a runtime: one protocol, one implementation per runtime.

``appliance.runtime.local`` runs every service as a process under supervisord on this host;
``appliance.runtime.compose`` runs the same services as containers through Docker compose. The CLI's
verbs (`up`, `down`, `status`, `restart`, `scale`, `upgrade`, `logs`, `backup`, `restore`) are written
once against :class:`Runtime`; what a runtime reports comes back as the values below, and what it
cannot do is a :class:`RuntimeFailure` whose message is one sentence for the operator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from appliance.backup.service import BackupResult, RestoreResult
    from appliance.core.model_settings import ModelConfig
    from appliance.runtime.settings import RuntimeSettings

__all__ = [
    "DEGRADED",
    "DOWN",
    "HEALTHY",
    "BackupStep",
    "Intro",
    "ModelChange",
    "ModelRow",
    "Restarted",
    "Runtime",
    "RuntimeFailure",
    "Scaled",
    "ServiceRow",
    "Started",
    "Status",
]

HEALTHY, DEGRADED, DOWN = 0, 1, 2  # `appliance status` exit codes

BackupStep = Callable[[str], None]  # called with each member as a backup adds it


class RuntimeFailure(Exception):
    """A runtime operation failed; the message is one sentence for the operator."""


@dataclass(frozen=True)
class Intro:
    """What `up` announces before it starts: ``title (detail)``, then each note on its own line."""

    title: str
    detail: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Started:
    """Where clients reach the stack `up` brought up; the optional fields are those a runtime knows."""

    chat_ui: str
    openai_base_url: str
    admin_key_file: Path
    model: str | None = None
    listen: str | None = None  # the gateway's listen address, when this runtime chose it
    lan_urls: tuple[str, ...] = ()
    healthy_in_s: float | None = None  # from starting the services to all healthy

    def report(self, ready_in_s: float) -> dict[str, Any]:
        """The `up --json` object."""
        fields: dict[str, Any] = {"chat_ui": self.chat_ui, "openai_base_url": self.openai_base_url}
        if self.listen is not None:
            fields.update(listen=self.listen, lan_urls=list(self.lan_urls), model=self.model)
        fields.update(admin_key_file=str(self.admin_key_file), ready_in_s=ready_in_s)
        if self.healthy_in_s is not None:
            fields["healthy_in_s"] = self.healthy_in_s
        return fields


@dataclass(frozen=True)
class ServiceRow:
    """One line of the `status` table: the service, whether it is healthy, and its cells by column."""

    name: str
    healthy: bool
    cells: dict[str, str]


@dataclass(frozen=True)
class Status:
    """What `status` found: an exit code, the `--json` report, and the same as a table with notes."""

    code: int
    report: dict[str, Any]
    columns: tuple[str, ...]  # the table's columns after "service"; "health" is coloured by ServiceRow.healthy
    rows: tuple[ServiceRow, ...]
    errors: tuple[str, ...] = ()  # shown above the table
    lines: tuple[str, ...] = ()  # shown under it

    @property
    def state(self) -> str:
        return str(self.report.get("state", "down"))


@dataclass(frozen=True)
class Restarted:
    """The services a restart went through, and how it says so (none: it says nothing)."""

    names: list[str]
    headline: str | None
    when_none: str = ""


@dataclass(frozen=True)
class Scaled:
    count: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelRow:
    """One model of `appliance models list`: its catalogue entry and the balancer's view of it (contract C3)."""

    alias: str
    resident: str
    pinned: bool
    workers: int  # dedicated workers (resident=always); 0 for an on_demand entry (it uses the swap hosts)
    state: str  # loaded | loading | unloaded | draining, "unknown" when the balancer does not answer
    memory_bytes: int
    path: str
    sha256: str
    serving: list[str] = field(default_factory=list)  # the worker URLs holding it now


@dataclass(frozen=True)
class ModelChange:
    """What `appliance models add|remove|pin` did: the workers started or moved, and those stopped."""

    alias: str
    action: str  # added | removed | pinned | unpinned
    budget: str  # the memory arithmetic after the change
    started: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)


class Runtime(Protocol):
    """The stack verbs, whichever runtime carries them out."""

    settings: RuntimeSettings
    # What `down` leaves behind, said after "Stopped" ("" when there is nothing to add).
    stopped_note: str
    # Whether `backup --every/--offsite` can run here (the runtime keeps running scheduled backups).
    schedules_backups: bool

    def intro(self) -> Intro:
        """What `up` is about to start; raises RuntimeFailure when it cannot (a missing model file)."""
        ...

    def up(self) -> Started:
        """Start whatever is not running, in dependency order, and wait until every service is ready."""
        ...

    def down(self) -> bool:
        """Drain and stop everything; False when nothing was running."""
        ...

    def status(self) -> Status: ...

    def restart(self, service: str | None, *, allow_outage: bool) -> Restarted:
        """Restart one service, or every worker one at a time (``inference``), or everything (None)."""
        ...

    def scale(self, count: int) -> Scaled:
        """Run ``count`` inference workers, adding or removing them live."""
        ...

    def upgrade(self, *, allow_outage: bool) -> list[str]:
        """Move every service to the installed code without a gap; the services in the order moved."""
        ...

    def logs(self, service: str, *, follow: bool, lines: int) -> None:
        """Write a service's last ``lines`` log lines to stdout (and follow them)."""
        ...

    def backup(
        self, to: Path | None, *, with_models: bool, keep: int, offsite: Path | None, step: BackupStep
    ) -> BackupResult:
        """A consistent snapshot of the running stack's data, verified."""
        ...

    def restore(
        self, archive: Path, *, dry_run: bool, key_file: Path | None, allow_unsigned: bool
    ) -> RestoreResult:
        """Verify ``archive``, put its data back and bring the stopped services up again."""
        ...

    def models(self) -> list[ModelRow]:
        """The catalogue and each model's state."""
        ...

    def add_model(self, config: ModelConfig) -> ModelChange:
        """Check (file, sha256, budget), write the entry and start a resident model's workers, live."""
        ...

    def remove_model(self, alias: str) -> ModelChange:
        """Drain the model's workers (running requests end normally) and delete its entry."""
        ...

    def pin_model(self, alias: str, pinned: bool) -> ModelChange:
        """Pin (never chosen for unload) or unpin an on_demand model."""
        ...
