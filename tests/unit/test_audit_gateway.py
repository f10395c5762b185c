"""The gateway's side of the audit log: one admin.view per viewing, and a record the file refuses still logged."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from appliance.core.audit import AuditLog
from gateway.audit_trail import AdminViews, audit
from gateway.keys import Principal


def test_polls_within_the_gap_are_one_view_and_a_later_visit_is_another() -> None:
    views = AdminViews(gap_s=300)
    assert views.is_new_view("key:a", now=1000.0)
    assert not any(views.is_new_view("key:a", now=1000.0 + 2 * poll) for poll in range(1, 200))  # 2 s polls
    assert views.is_new_view("key:b", now=1400.0)  # another admin: their own view
    assert views.is_new_view("key:a", now=1398.0 + 300)  # back after a pause as long as the gap


def test_the_views_table_stays_bounded() -> None:
    views = AdminViews(gap_s=10, limit=100)
    for index in range(1000):
        views.is_new_view(f"key:{index}", now=float(index * 11))
    assert len(views) <= 101


def test_a_record_the_file_refuses_is_logged_with_its_fields_and_the_act_stands(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq":1')  # a cut tail: appends are refused until an admin looks
    admin = Principal(key_id="key_0123456789ab", name="ops", digest="d", scopes=frozenset({"admin"}))
    with caplog.at_level(logging.ERROR, logger="gateway.audit"):
        asyncio.run(audit(AuditLog(path), admin, "key.revoke", "key:key_ba9876543210"))
    failed = [r for r in caplog.records if r.getMessage() == "audit append failed"]
    assert len(failed) == 1
    assert (failed[0].audit_actor, failed[0].audit_action, failed[0].audit_target) == (  # type: ignore[attr-defined]
        "key:key_0123456789ab", "key.revoke", "key:key_ba9876543210")
    assert path.read_bytes() == b'{"seq":1'
