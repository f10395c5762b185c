"""Stored responses (gateway/responses/store.py): per key, on disk, gone after the retention."""

from __future__ import annotations

import stat
from pathlib import Path

from gateway.responses.store import STORE_FILE, ResponseStore, StoredResponse

RID = "resp_" + "a" * 48


def _stored(created_at: int) -> StoredResponse:
    return StoredResponse({"id": RID, "created_at": created_at, "output": []}, [{"id": "msg_1"}], [{"id": "msg_1"}])


def test_a_response_is_its_keys_alone_survives_a_reopen_and_goes_after_the_retention(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = ResponseStore(tmp_path / "responses", retention_days=1, clock=lambda: now[0])
    store.put("key_a", _stored(int(now[0])))
    assert store.get(RID, "key_b") is None and not store.delete(RID, "key_b")
    store.close()
    reopened = ResponseStore(tmp_path / "responses", retention_days=1, clock=lambda: now[0])
    found = reopened.get(RID, "key_a")
    assert found is not None and found.items == [{"id": "msg_1"}]
    now[0] += 86400 + 1  # past the retention: never read again, then pruned
    assert reopened.get(RID, "key_a") is None
    assert reopened.prune() == 1
    reopened.checkpoint()
    reopened.close()

    path = tmp_path / "responses" / STORE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
