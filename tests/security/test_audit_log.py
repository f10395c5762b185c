"""The audit log through the real gateway (real Redis, the real RAG service) and the real CLI.

Each act is done once, by a key made for this module (so other tests' records on the shared stack
are told apart by actor), then the log is read back: every act appears once with its actor, target
and time. `appliance backup` and `appliance restore` run as processes (actor ``cli:<os user>``),
appending to the same file as the gateway. Then `appliance audit verify` passes on the real log,
anchored by the backup's MAC'd manifest, and fails, naming the record, on copies of it with one
byte edited, a record removed, two records swapped and the tail cut.
"""

from __future__ import annotations

import getpass
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.core.audit import AuditHead, AuditLog
from tests.support.processes import run_cli
from tests.support.stack import LoopbackAppliance

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

ADMIN_SCOPES = ["admin", "collections"]


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _when(record: dict[str, Any]) -> datetime:
    return datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class Acts:
    """What this module did, and where the log is."""

    def __init__(self, stack: LoopbackAppliance, tmp: Path) -> None:
        self.stack, self.tmp = stack, tmp
        self.data_dir = stack.tmp / "data"
        self.log = self.data_dir / "audit" / "audit.jsonl"
        self.started = datetime.now(UTC)
        self.ids: dict[str, str] = {}
        self.archive = Path()

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.stack.gateway, timeout=60, headers={"Authorization": f"Bearer {key}"})

    def cli_env(self, data_dir: Path) -> dict[str, str]:
        env = dict(self.stack.env["gateway"])
        env["APPLIANCE_DATA_DIR"] = str(data_dir)
        env["APPLIANCE_RUNTIME_REDIS_PORT"] = self.stack.redis_url.rsplit(":", 1)[1].split("/")[0]
        return env


def _gateway_acts(acts: Acts) -> None:
    with acts.http(acts.stack.admin_key) as root:
        made = root.post("/admin/keys", json={"name": "audit-admin", "scopes": ADMIN_SCOPES})
        assert made.status_code == 201, made.text
    acts.ids["admin"], admin_key = made.json()["id"], made.json()["key"]
    with acts.http(admin_key) as admin:
        target = admin.post("/admin/keys", json={"name": "audit-target", "scopes": ["chat"]})
        assert target.status_code == 201, target.text
        acts.ids["target"] = target.json()["id"]
        assert "sk-app-" in target.json()["key"]
        assert admin.patch(f"/admin/keys/{acts.ids['target']}", json={"priority": "batch"}).status_code == 200
        for _ in range(3):  # the dashboard's polls: one view
            assert admin.get("/admin/status").status_code == 200
        assert admin.get("/admin/usage", params={"days": 2}).status_code == 200
        assert admin.post("/v1/collections", json={"name": "audited-docs"}).status_code == 201
        shared = admin.put("/admin/collections/audited-docs/sharing", json={"shared": True})
        assert shared.status_code == 200, shared.text
        assert admin.delete("/v1/collections/audited-docs").status_code == 200
        assert admin.delete(f"/admin/keys/{acts.ids['target']}").status_code == 200


def _backup_and_restore(acts: Acts) -> None:
    # The CLI logs in to Redis as `admin` from data/run/redis, as on an appliance host.
    source = acts.stack.tmp / "redis" / "run" / "redis" / "admin.password"
    login = acts.data_dir / "run" / "redis" / "admin.password"
    login.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, login)
    made = run_cli(["backup", "--to", str(acts.tmp / "backups"), "--json"], env=acts.cli_env(acts.data_dir),
                   cwd=acts.tmp)
    acts.archive = Path(json.loads(made.stdout)["archive"])
    fresh = acts.tmp / "fresh-host"
    run_cli(["restore", str(acts.archive), "--key", str(acts.data_dir / "run" / "backup_key")],
            env=acts.cli_env(fresh), cwd=acts.tmp)


@pytest.fixture(scope="module")
def acts(rag_stack: LoopbackAppliance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Acts]:
    done = Acts(rag_stack, tmp_path_factory.mktemp("audit"))
    _gateway_acts(done)
    _backup_and_restore(done)
    yield done


def test_every_gateway_act_appears_once_with_actor_target_and_time(acts: Acts) -> None:
    ended = datetime.now(UTC)
    records = _records(acts.log)
    mine = [(r["action"], r["target"]) for r in records if r["actor"] == f"key:{acts.ids['admin']}"]
    target, collection = f"key:{acts.ids['target']}", "collection:audited-docs"
    assert sorted(mine) == sorted([
        ("key.create", target), ("key.update", target), ("admin.view", "admin:/admin/status"),
        ("usage.read", "usage"), ("collection.create", collection), ("collection.share", collection),
        ("collection.delete", collection), ("key.revoke", target),
    ])
    created = [r for r in records if r["action"] == "key.create" and r["target"] == f"key:{acts.ids['admin']}"]
    boot = [r for r in records if r["actor"] == "system:bootstrap"]  # the gateway's first start made the admin key
    assert len(boot) == 1 and boot[0]["action"] == "key.create" and boot[0]["seq"] == 1
    assert len(created) == 1 and created[0]["actor"] == boot[0]["target"]  # audit-admin made by that key
    for record in records:
        if record["actor"] == f"key:{acts.ids['admin']}":
            assert acts.started <= _when(record) <= ended
            assert record["outcome"] == "ok"


def test_no_secret_or_prompt_is_in_the_log(acts: Acts) -> None:
    raw = acts.log.read_text()
    assert "sk-app-" not in raw
    assert acts.stack.admin_key not in raw and acts.stack.token not in raw


def test_backup_and_restore_appear_as_the_cli_user_and_the_manifest_anchors_the_head(acts: Acts) -> None:
    actor = f"cli:{getpass.getuser()}"
    backups = [r for r in _records(acts.log) if r["action"] == "backup.create" and r["target"] == acts.archive.name]
    assert len(backups) == 1 and backups[0]["actor"] == actor
    anchored = backups[0]["detail"]["anchored_seq"]
    assert 0 < anchored < backups[0]["seq"]  # the head when the archive was written, before this record
    restored_log = acts.tmp / "fresh-host" / "audit" / "audit.jsonl"  # the archived log, put in place
    restores = [r for r in _records(restored_log) if r["action"] == "backup.restore"]
    assert len(restores) == 1 and restores[0]["actor"] == actor and restores[0]["target"] == acts.archive.name
    assert restores[0]["detail"]["archive_audit_seq"] == anchored
    verified = run_cli(["audit", "verify", "--backup", str(acts.archive), "--key",
                        str(acts.data_dir / "run" / "backup_key"), "--json"],
                       env=acts.cli_env(acts.tmp / "fresh-host"), cwd=acts.tmp)
    assert json.loads(verified.stdout)["ok"] is True


def test_a_collection_ingest_creates_is_recorded_as_the_cli_user(acts: Acts) -> None:
    """`appliance ingest` creates the collection in the RAG service directly, not through the gateway."""
    doc = acts.tmp / "policy.txt"
    doc.write_text("Expense reports are due on the fifth working day of each month.\n")
    env = {**acts.cli_env(acts.data_dir), "APPLIANCE_RUNTIME_RAG_PORT": acts.stack.rag.rsplit(":", 1)[1]}
    for _ in range(2):  # the second ingest finds it there: no second record
        run_cli(["ingest", str(doc), "--collection", "audited-ingest", "--json"], env=env, cwd=acts.tmp)
    made = [r for r in _records(acts.log) if r["target"] == "collection:audited-ingest"]
    assert [(r["action"], r["actor"], r["detail"]) for r in made] == [
        ("collection.create", f"cli:{getpass.getuser()}", {"via": "ingest"})]
    with acts.http(acts.stack.admin_key) as admin:
        assert admin.delete("/v1/collections/audited-ingest").status_code == 200


def test_a_restore_never_rolls_the_live_log_back(acts: Acts) -> None:
    host = acts.tmp / "fresh-host"
    log = host / "audit" / "audit.jsonl"
    before = log.read_bytes()
    run_cli(["restore", str(acts.archive), "--key", str(acts.data_dir / "run" / "backup_key")],
            env=acts.cli_env(host), cwd=acts.tmp)
    after = log.read_bytes()
    assert after.startswith(before)  # the records since the backup are still there, the new one appended
    added = [json.loads(line) for line in after[len(before):].splitlines()]
    assert [r["action"] for r in added] == ["backup.restore"]
    assert run_cli(["audit", "verify"], env=acts.cli_env(host), cwd=acts.tmp).returncode == 0


def _verify(acts: Acts, path: Path, anchor: AuditHead) -> tuple[int, dict[str, Any]]:
    result = run_cli(["audit", "verify", "--file", str(path), "--anchor", str(anchor), "--json"],
                     env=acts.cli_env(acts.data_dir), cwd=acts.tmp, check=False)
    return result.returncode, json.loads(result.stdout)


def test_audit_verify_passes_on_the_real_log_against_the_backup_anchor(acts: Acts) -> None:
    result = run_cli(["audit", "verify", "--backup", str(acts.archive), "--json"], env=acts.cli_env(acts.data_dir),
                     cwd=acts.tmp)
    report = json.loads(result.stdout)
    assert report["ok"] is True and len(report["anchors"]) == 1 and report["records"] >= 10


@pytest.mark.parametrize("tampering", ["edit_one_byte", "remove", "swap", "truncate_tail"])
def test_audit_verify_names_the_tampered_record(acts: Acts, tampering: str) -> None:
    copy = acts.tmp / f"{tampering}.jsonl"
    shutil.copy(acts.log, copy)
    head = AuditLog(copy).head()
    assert head is not None and head.seq >= 10
    assert _verify(acts, copy, head)[0] == 0
    lines = copy.read_bytes().splitlines(keepends=True)
    where = 4  # 0-based: the fifth record
    if tampering == "edit_one_byte":
        at = lines[where].index(b'"target":"') + len(b'"target":"')
        lines[where] = lines[where][:at] + bytes([lines[where][at] ^ 1]) + lines[where][at + 1:]
        expected = {"kind": "edited", "line": where + 1, "seq": where + 1}
    elif tampering == "remove":
        del lines[where]
        expected = {"kind": "removed", "line": where + 1, "seq": where + 1}
    elif tampering == "swap":
        lines[where], lines[where + 2] = lines[where + 2], lines[where]
        expected = {"kind": "reordered", "line": where + 1, "seq": where + 3}
    else:
        del lines[where:]
        expected = {"kind": "truncated", "line": where, "seq": head.seq}
    copy.write_bytes(b"".join(lines))
    code, report = _verify(acts, copy, head)
    assert code == 1 and report["ok"] is False
    assert {name: report["problem"][name] for name in expected} == expected, report["problem"]


def test_export_prints_the_stored_lines(acts: Acts) -> None:
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    result = run_cli(["audit", "export", "--json", "--since", today], env=acts.cli_env(acts.data_dir), cwd=acts.tmp)
    stored = [line for line in acts.log.read_text().splitlines() if json.loads(line)["time"] >= today]
    assert result.stdout.splitlines() == stored
