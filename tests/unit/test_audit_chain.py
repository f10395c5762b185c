"""The audit log's chain: appends from several processes stay one chain, and every kind of tampering is named.

Real files, real processes (two appenders racing on one file with flock); Hypothesis drives the
property that an intact log verifies and that one edited byte, a removed record, two swapped records
or a cut tail (against the anchor) is found at the record where it happened.
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from appliance.backup.archive import ArchiveWriter, verify_archive
from appliance.backup.audit_snapshot import add_audit_log, manifest_anchor
from appliance.backup.key import load_or_create_key
from appliance.core.audit import GENESIS, AuditError, AuditHead, AuditLog, record_hash
from appliance.core.audit_verify import read_records, verify_log
from appliance.core.logging import JsonFormatter
from tests.support.processes import REPO

ACTIONS = ("key.create", "key.update", "key.revoke", "collection.create", "usage.read", "admin.view")
text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
detail_value = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=20), st.booleans(),
                         st.integers(-(1 << 63), (1 << 63) - 1), st.floats(allow_nan=False, allow_infinity=False))
entry = st.fixed_dictionaries({"actor": text, "action": st.sampled_from(ACTIONS), "target": text,
                               "detail": st.dictionaries(text, detail_value, max_size=3)})


def _fill(path: Path, entries: list[dict[str, object]]) -> AuditLog:
    log = AuditLog(path)
    for item in entries:
        log.append(actor=str(item["actor"]), action=str(item["action"]), target=str(item["target"]),
                   detail=item["detail"])  # type: ignore[arg-type]
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


@pytest.fixture
def log_of_five(tmp_path: Path) -> tuple[Path, AuditHead]:
    path = tmp_path / "audit.jsonl"
    log = _fill(path, [{"actor": f"key:k{i}", "action": "key.create", "target": f"key:t{i}", "detail": {"n": i}}
                       for i in range(5)])
    head = log.head()
    assert head is not None and head.seq == 5
    return path, head


def test_an_intact_log_verifies_and_each_record_is_chained_to_the_one_before(
        log_of_five: tuple[Path, AuditHead]) -> None:
    path, head = log_of_five
    verdict = verify_log(path, [head])
    assert verdict.ok and verdict.records == 5 and verdict.head == head
    records = [json.loads(line) for line in _lines(path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert all(later["prev"] == earlier["hash"] for earlier, later in itertools.pairwise(records))
    assert all(record_hash(r) == r["hash"] for r in records)
    assert all(r["time"].endswith("Z") and r["actor"].startswith("key:") for r in records)


def test_one_edited_byte_is_named(log_of_five: tuple[Path, AuditHead]) -> None:
    path, head = log_of_five
    lines = _lines(path)
    lines[2] = lines[2].replace(b'"target":"key:t2"', b'"target":"key:t9"')
    _write(path, lines)
    problem = verify_log(path, [head]).problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("edited", 3, 3)


def test_an_edit_that_reads_as_the_same_value_still_shows(tmp_path: Path) -> None:
    """The hash covers the stored bytes, not a re-serialization: 1e20 spelt 1E20 is an edit too."""
    path = tmp_path / "audit.jsonl"
    _fill(path, [{"actor": "key:a", "action": "usage.read", "target": "usage", "detail": {"x": 1e20}}])
    path.write_bytes(path.read_bytes().replace(b"1e20", b"1E20"))
    assert json.loads(path.read_bytes())["detail"] == {"x": 1e20}
    problem = verify_log(path).problem
    assert problem is not None and (problem.kind, problem.line) == ("edited", 1)


def test_an_edited_record_with_its_hash_recomputed_is_named_by_the_next_link(
        log_of_five: tuple[Path, AuditHead]) -> None:
    path, _ = log_of_five
    lines = _lines(path)
    record = json.loads(lines[1])
    record["actor"] = "key:someone-else"
    record["hash"] = record_hash(record)
    lines[1] = msgspec.json.encode(record) + b"\n"  # exactly as the writer stores a record
    _write(path, lines)
    problem = verify_log(path).problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("edited", 2, 2)


def test_a_removed_record_is_named(log_of_five: tuple[Path, AuditHead]) -> None:
    path, head = log_of_five
    lines = _lines(path)
    del lines[1]
    _write(path, lines)
    problem = verify_log(path, [head]).problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("removed", 2, 2)
    assert "seq 2 is missing" in problem.message


def test_two_swapped_records_are_named(log_of_five: tuple[Path, AuditHead]) -> None:
    path, head = log_of_five
    lines = _lines(path)
    lines[1], lines[3] = lines[3], lines[1]
    _write(path, lines)
    problem = verify_log(path, [head]).problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("reordered", 2, 4)
    assert "comes before seq 2 (at line 4)" in problem.message


def test_a_cut_tail_is_found_against_the_anchor_only(log_of_five: tuple[Path, AuditHead]) -> None:
    path, head = log_of_five
    _write(path, _lines(path)[:3])
    assert verify_log(path).ok  # what the chain alone cannot show
    problem = verify_log(path, [head]).problem
    assert problem is not None and (problem.kind, problem.line, problem.seq) == ("truncated", 3, 5)


def test_a_chain_recomputed_from_a_record_on_is_found_against_the_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _fill(path, [{"actor": "key:a", "action": "key.create", "target": f"key:{i}", "detail": {}}
                       for i in range(4)])
    anchor = log.head()
    assert anchor is not None
    forged = tmp_path / "forged.jsonl"
    _fill(forged, [{"actor": "key:a", "action": "key.create", "target": f"key:{i}", "detail": {}} for i in range(2)]
          + [{"actor": "key:a", "action": "key.revoke", "target": f"key:{i}", "detail": {}} for i in range(2)])
    assert verify_log(forged).ok
    problem = verify_log(forged, [anchor]).problem
    assert problem is not None and (problem.kind, problem.seq) == ("rewritten", 4)


def test_a_partial_last_line_is_named_and_blocks_appends(log_of_five: tuple[Path, AuditHead]) -> None:
    path, _ = log_of_five
    path.write_bytes(path.read_bytes()[:-20])
    problem = verify_log(path).problem
    assert problem is not None and (problem.kind, problem.line) == ("partial", 5)
    with pytest.raises(AuditError, match="partial record"):
        AuditLog(path).append(actor="key:x", action="key.create", target="key:y")


def test_secrets_and_malformed_fields_are_refused_not_written(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for bad in ({"action": "Key Create"}, {"target": ""}, {"actor": "x" * 2000}, {"target": "\ud800"}):
        fields = {"actor": "key:a", "action": "key.create", "target": "key:b", **bad}
        with pytest.raises(ValueError):
            log.append(**fields)
    with pytest.raises(ValueError):
        log.append(actor="key:a", action="key.create", target="key:b", detail={"x": float("nan")})
    assert not (tmp_path / "audit.jsonl").exists()


def test_the_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    AuditLog(path).append(actor="key:a", action="key.create", target="key:b")
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700


_APPENDER = """
import sys
from pathlib import Path
from appliance.core.audit import AuditLog
log = AuditLog(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    log.append(actor=f"key:{sys.argv[2]}", action="usage.read", target=f"usage:{i}")
"""


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    each = 150
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), name, str(each)], cwd=REPO)
             for name in ("gateway", "cli")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    verdict = verify_log(path)
    assert verdict.ok, verdict.problem
    assert verdict.records == 2 * each
    actors = [json.loads(raw)["actor"] for raw in read_records(path)]
    assert actors.count("key:gateway") == each and actors.count("key:cli") == each


def test_export_since_filters_by_time_and_keeps_lines_verbatim(log_of_five: tuple[Path, AuditHead]) -> None:
    path, _ = log_of_five
    stored = [line.rstrip(b"\n") for line in _lines(path)]
    assert list(read_records(path)) == stored
    assert list(read_records(path, "2999-01-01")) == []
    assert list(read_records(path, "2000-01-01T00:00")) == stored


def test_the_head_goes_to_the_structured_log_every_n_records(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", anchor_every=2)
    with caplog.at_level(logging.INFO, logger="appliance.audit"):
        records = [log.append(actor="key:a", action="key.create", target=f"key:{i}") for i in range(5)]
    anchors = [r for r in caplog.records if r.getMessage() == "audit anchor"]
    assert [a.audit_seq for a in anchors] == [2, 4]  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter("gateway").format(anchors[-1]))
    assert AuditHead.parse(line["audit_anchor"]) == AuditHead(4, records[3].hash)


def test_a_backup_manifest_anchors_the_head_under_its_mac(tmp_path: Path) -> None:
    log = _fill(tmp_path / "audit.jsonl", [{"actor": "key:a", "action": "key.create", "target": "key:b",
                                            "detail": {}}] * 3)
    key = load_or_create_key(tmp_path / "backup_key")
    writer = ArchiveWriter(tmp_path / "backups", key)
    head = add_audit_log(writer, log.path)
    archive = writer.finish()
    manifest = verify_archive(archive, key)
    assert head == log.head() and manifest_anchor(manifest) == head
    assert "audit/audit.jsonl" in manifest.files


MUTATIONS = ("edit", "remove", "swap", "truncate")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(entry, min_size=2, max_size=8), mutation=st.sampled_from(MUTATIONS),
       a=st.integers(0, 1 << 20), b=st.integers(0, 1 << 20), byte=st.integers(0, 255))
@example(entries=[{"actor": "0", "action": "key.create", "target": "0", "detail": {}}] * 2, mutation="swap",
         a=0, b=0, byte=0)
def test_any_single_tampering_is_found_where_it_happened(entries: list[dict[str, object]], mutation: str,
                                                          a: int, b: int, byte: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "audit.jsonl"
        head = _fill(path, entries).head()
        assert head is not None
        assert verify_log(path, [head]).ok
        lines = _lines(path)
        expected_line = _tamper(lines, mutation, a, b, byte)
        _write(path, lines)
        problem = verify_log(path, [head]).problem
        assert problem is not None, mutation
        assert problem.line == expected_line, (mutation, problem)


def _tamper(lines: list[bytes], mutation: str, a: int, b: int, byte: int) -> int:
    """Change ``lines`` in place (``a``, ``b`` pick where, ``byte`` what); the 1-based line the verdict names."""
    n = len(lines)
    if mutation == "edit":
        index = a % n
        position = b % (len(lines[index]) - 1)  # not the newline
        old = lines[index][position]
        new = byte if byte != old else (byte + 1) % 256
        lines[index] = lines[index][:position] + bytes([new]) + lines[index][position + 1:]
        return index + 1
    if mutation == "remove":
        index = a % (n - 1)  # removing the last one is the truncate case
        del lines[index]
        return index + 1
    if mutation == "swap":
        first = a % (n - 1)
        second = first + 1 + b % (n - 1 - first)
        lines[first], lines[second] = lines[second], lines[first]
        return first + 1
    keep = a % n
    del lines[keep:]
    return keep
