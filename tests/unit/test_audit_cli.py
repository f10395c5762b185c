"""Configuration changes in the audit log: `appliance up` with changed flags or appliance.toml, and `scale`.

Driven through the CLI with the recording runtime (tests/support/recording_runtime.py) (what starts the services is
not what is checked here: the record the CLI writes is).
"""

from __future__ import annotations

import getpass
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.cli.audit_trail import record
from appliance.core.audit import AuditLog
from appliance.core.logging import JsonFormatter
from appliance.runtime.settings import RuntimeSettings
from tests.support.recording_runtime import RecordingRuntime, invoke


@pytest.fixture
def made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[RecordingRuntime]:
    """A temporary cwd, data dir and (empty) config file, as test_cli_runtime's fixture of the same name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "empty.toml"))
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(tmp_path / "data"))
    return []


def _changes(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "data" / "audit" / "audit.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["action"] == "config.change"]


def test_up_records_a_config_change_only_when_the_flags_or_the_file_changed(
        made: list[RecordingRuntime], tmp_path: Path) -> None:
    assert invoke(made, "up")[0] == 0
    first = _changes(tmp_path)
    assert len(first) == 1 and first[0]["detail"]["first"] is True
    assert first[0]["actor"] == f"cli:{getpass.getuser()}" and first[0]["target"] == "appliance"
    assert invoke(made, "up")[0] == 0
    assert len(_changes(tmp_path)) == 1  # the same configuration: nothing to record
    assert invoke(made, "up", "--workers", "3")[0] == 0
    assert invoke(made, "up")[0] == 0  # the remembered flag again: no change
    (tmp_path / "empty.toml").write_text("[gateway]\ndefault_rpm = 100\n")
    assert invoke(made, "up")[0] == 0
    changes = _changes(tmp_path)
    assert [c["detail"]["changed"] for c in changes[1:]] == ["workers", "config_file_sha256"]
    assert all(c["detail"]["first"] is False for c in changes[1:])


def test_scale_records_the_new_worker_count_once(made: list[RecordingRuntime], tmp_path: Path) -> None:
    assert invoke(made, "up")[0] == 0
    assert invoke(made, "scale", "inference=4")[0] == 0
    assert invoke(made, "up")[0] == 0  # up after scale keeps the scaled count: not another change
    changes = _changes(tmp_path)
    assert [c["detail"]["changed"] for c in changes] == [changes[0]["detail"]["changed"], "workers"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root creates files for another user")
def test_a_log_the_root_cli_creates_stays_the_data_owners(tmp_path: Path) -> None:
    """On compose the gateway appends as the containers' uid: a root CLI must not leave the log root's."""
    gateway_data = tmp_path / "data" / "gateway"
    gateway_data.mkdir(parents=True)
    os.chown(gateway_data, 10001, 10001)
    settings = RuntimeSettings(data_dir=tmp_path / "data", runtime="compose")
    record(settings, action="backup.create", target="archive.tar.gz")
    log = gateway_data / "audit" / "audit.jsonl"
    assert (log.stat().st_uid, log.parent.stat().st_uid) == (10001, 10001)
    assert json.loads(log.read_text())["actor"] == f"cli:{getpass.getuser()}"


def test_verify_takes_its_anchors_from_a_saved_gateway_log(made: list[RecordingRuntime], tmp_path: Path) -> None:
    """`--log`: the "audit anchor" lines the gateway writes every N records, read back from its JSON-lines log."""
    log = AuditLog(tmp_path / "audit.jsonl", anchor_every=2)
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(JsonFormatter("gateway"))
    logging.getLogger("appliance.audit").addHandler(handler)
    logging.getLogger("appliance.audit").setLevel(logging.INFO)
    try:
        for index in range(4):
            log.append(actor="key:a", action="key.revoke", target=f"key:{index}")
    finally:
        logging.getLogger("appliance.audit").removeHandler(handler)
    saved = tmp_path / "gateway.log"
    saved.write_text('not json "audit anchor"\n' + handler.stream.getvalue())  # type: ignore[attr-defined]
    code, stdout, _ = invoke(made, "audit", "verify", "--file", str(log.path), "--log", str(saved), "--json")
    report = json.loads(stdout)
    assert code == 0 and [a.split(":")[0] for a in report["anchors"]] == ["2", "4"]
    log.path.write_bytes(b"".join(log.path.read_bytes().splitlines(keepends=True)[:3]))
    code, stdout, _ = invoke(made, "audit", "verify", "--file", str(log.path), "--log", str(saved), "--json")
    assert code == 1 and json.loads(stdout)["problem"]["kind"] == "truncated"
