"""The prompt cache on disk (inference.diskcache): round trip, bound, and every file it must refuse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.core.ids import KeyId
from inference.diskcache import DiskPromptCache
from inference.kvstore import ContextSnapshot, HostPromptCache, SavedPrefix

TOKEN = "disk-cache-test-token-padded-to-32-chars"
MODEL_A = "a" * 64
MODEL_B = "b" * 64
LAYOUT = "v1;exact=0;swa_full=1"


def prefix(model: str, first: int, length: int = 40, state_bytes: int = 1000,
           scope: KeyId | None = None) -> SavedPrefix:
    return SavedPrefix(model, scope, tuple(range(first, first + length)), bytes([first % 256]) * state_bytes)


def load(disk: DiskPromptCache, model: str = MODEL_A, capacity: int = 1 << 20,
         layout: str = LAYOUT) -> list[SavedPrefix]:
    return disk.load(model, layout, capacity=capacity, max_tokens=4096)[0]


def test_a_saved_cache_comes_back_newest_first_with_its_scopes(tmp_path: Path) -> None:
    disk = DiskPromptCache(tmp_path, TOKEN, 1 << 20)
    saved = [prefix(MODEL_A, 1, scope=KeyId.trusted("key_alice")), prefix(MODEL_A, 100)]
    report = disk.save(MODEL_A, LAYOUT, saved)
    assert (report.prefixes, report.tokens) == (2, 80)
    assert set(load(disk)) == set(saved)
    assert (tmp_path / MODEL_A).is_dir()


def test_a_new_save_comes_first_and_older_files_stay_within_the_bound(tmp_path: Path) -> None:
    disk = DiskPromptCache(tmp_path, TOKEN, 1 << 20)
    disk.save(MODEL_A, LAYOUT, [prefix(MODEL_A, 1), prefix(MODEL_A, 100)])
    old = os.stat(next((tmp_path / MODEL_A).iterdir())).st_mtime - 10
    for path in (tmp_path / MODEL_A).iterdir():
        os.utime(path, (old, old))
    disk.save(MODEL_A, LAYOUT, [prefix(MODEL_A, 200)])
    assert load(disk)[0] == prefix(MODEL_A, 200) and len(load(disk)) == 3
    disk.save(MODEL_A, LAYOUT, [])  # a save with nothing to keep loses nothing
    assert len(load(disk)) == 3


def test_files_of_one_model_are_never_read_as_another(tmp_path: Path) -> None:
    disk = DiskPromptCache(tmp_path, TOKEN, 1 << 20)
    disk.save(MODEL_A, LAYOUT, [prefix(MODEL_A, 1)])
    (tmp_path / MODEL_B).mkdir()
    for path in (tmp_path / MODEL_A).iterdir():  # model A's file, copied where model B's would be
        (tmp_path / MODEL_B / path.name).write_bytes(path.read_bytes())
    entries, report = disk.load(MODEL_B, LAYOUT, capacity=1 << 20, max_tokens=4096)
    assert entries == [] and report.ignored == 1
    assert disk.save(MODEL_B, LAYOUT, [prefix(MODEL_A, 1)]).prefixes == 0  # nor filed under it


def test_saving_a_prefix_again_marks_its_file_newest_without_rewriting_it(tmp_path: Path) -> None:
    disk = DiskPromptCache(tmp_path, TOKEN, 1 << 20)
    disk.save(MODEL_A, LAYOUT, [prefix(MODEL_A, 1), prefix(MODEL_A, 100)])
    files = {path.name: path.stat().st_ino for path in (tmp_path / MODEL_A).iterdir()}
    old = min(path.stat().st_mtime for path in (tmp_path / MODEL_A).iterdir()) - 10
    for path in (tmp_path / MODEL_A).iterdir():
        os.utime(path, (old, old))
    disk.save(MODEL_A, LAYOUT, [prefix(MODEL_A, 1)])
    assert {path.name: path.stat().st_ino for path in (tmp_path / MODEL_A).iterdir()} == files
    assert load(disk)[0] == prefix(MODEL_A, 1)


def test_another_context_layout_is_not_restored(tmp_path: Path) -> None:
    disk = DiskPromptCache(tmp_path, TOKEN, 1 << 20)
    disk.save(MODEL_A, LAYOUT, [prefix(MODEL_A, 1)])
    assert load(disk, layout="v1;exact=1;swa_full=1") == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "junk"])
def test_a_damaged_file_is_ignored_and_the_others_served(tmp_path: Path, damage: str) -> None:
    disk = DiskPromptCache(tmp_path, TOKEN, 1 << 20)
    disk.save(MODEL_A, LAYOUT, [prefix(MODEL_A, 1), prefix(MODEL_A, 100)])
    victim = sorted((tmp_path / MODEL_A).iterdir())[0]
    data = victim.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "flip": data[:50] + bytes([data[50] ^ 1]) + data[51:],
               "empty": b"", "junk": os.urandom(len(data))}[damage]
    victim.write_bytes(damaged)
    entries, report = disk.load(MODEL_A, LAYOUT, capacity=1 << 20, max_tokens=4096)
    assert len(entries) == 1 and report.ignored == 1


def test_a_file_written_without_the_token_is_refused(tmp_path: Path) -> None:
    """A local process that can write the data dir but not read the internal token cannot plant KV cells."""
    DiskPromptCache(tmp_path, "another-token-padded-to-32-characters!", 1 << 20).save(
        MODEL_A, LAYOUT, [prefix(MODEL_A, 1, scope=KeyId.trusted("key_victim"))])
    entries, report = DiskPromptCache(tmp_path, TOKEN, 1 << 20).load(MODEL_A, LAYOUT, capacity=1 << 20,
                                                                    max_tokens=4096)
    assert entries == [] and report.ignored == 1


def test_a_prefix_longer_than_the_context_is_skipped(tmp_path: Path) -> None:
    disk = DiskPromptCache(tmp_path, TOKEN, 1 << 20)
    disk.save(MODEL_A, LAYOUT, [prefix(MODEL_A, 1, length=300)])
    assert disk.load(MODEL_A, LAYOUT, capacity=1 << 20, max_tokens=255)[0] == []


def test_the_bound_keeps_the_newest_across_models(tmp_path: Path) -> None:
    one = len(DiskPromptCache(tmp_path, TOKEN, 0).encode(MODEL_A, LAYOUT, prefix(MODEL_A, 1)))
    disk = DiskPromptCache(tmp_path, TOKEN, 3 * one)
    report = disk.save(MODEL_A, LAYOUT, [prefix(MODEL_A, i) for i in (1, 100, 200, 300)])
    assert report.prefixes == 3 and report.bytes <= 3 * one  # the first three: the most valuable
    assert {entry.tokens[0] for entry in load(disk)} == {1, 100, 200}
    old = os.stat(next((tmp_path / MODEL_A).iterdir())).st_mtime - 10
    for path in (tmp_path / MODEL_A).iterdir():
        os.utime(path, (old, old))
    disk.save(MODEL_B, LAYOUT, [prefix(MODEL_B, 5), prefix(MODEL_B, 6)])  # B is newer: A makes room
    total = sum(path.stat().st_size for path in tmp_path.glob("*/*.kv"))
    assert total <= 3 * one
    assert len(load(disk, MODEL_B)) == 2 and len(load(disk)) == 1


def test_loading_stops_at_the_host_caches_capacity(tmp_path: Path) -> None:
    disk = DiskPromptCache(tmp_path, TOKEN, 1 << 20)
    disk.save(MODEL_A, LAYOUT, [prefix(MODEL_A, i) for i in (1, 100, 200)])
    assert len(load(disk, capacity=2500)) == 2


def test_nothing_is_written_with_a_zero_bound(tmp_path: Path) -> None:
    DiskPromptCache(tmp_path, TOKEN, 0).save(MODEL_A, LAYOUT, [prefix(MODEL_A, 1)])
    assert not any(tmp_path.iterdir())


def test_a_model_name_that_is_not_a_digest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sha256"):
        DiskPromptCache(tmp_path, TOKEN, 1 << 20).directory("../../etc")


def test_the_host_cache_lists_its_entries_newest_first() -> None:
    host = HostPromptCache(1 << 20, MODEL_A)
    host.put(None, list(range(1, 41)), b"x" * 10)
    host.put(None, list(range(100, 140)), b"y" * 10)
    assert [entry.tokens[0] for entry in host.newest_first()] == [100, 1]


SNAPSHOT = ContextSnapshot(MODEL_A, ((KeyId.trusted("key_alice"), (1, 2, 3)), (None, ())), b"cells" * 100)
SLOTS_LAYOUT = LAYOUT + ";slots=2;n_ctx=1024"


def test_the_slots_snapshot_comes_back_and_only_for_its_model_layout_and_context(tmp_path: Path) -> None:
    disk = DiskPromptCache(tmp_path, TOKEN, 1 << 20)
    assert disk.save_snapshot(SNAPSHOT, SLOTS_LAYOUT) > 0
    assert disk.load_snapshot(MODEL_A, SLOTS_LAYOUT, max_tokens=1024) == SNAPSHOT
    assert disk.load_snapshot(MODEL_A, LAYOUT + ";slots=4;n_ctx=1024", max_tokens=1024) is None
    assert disk.load_snapshot(MODEL_A, SLOTS_LAYOUT, max_tokens=2) is None  # a slot longer than the context
    assert disk.load_snapshot(MODEL_B, SLOTS_LAYOUT, max_tokens=1024) is None
    (tmp_path / MODEL_B).mkdir()
    (tmp_path / MODEL_B / "slots.kvs").write_bytes((tmp_path / MODEL_A / "slots.kvs").read_bytes())
    assert disk.load_snapshot(MODEL_B, SLOTS_LAYOUT, max_tokens=1024) is None
    assert load(disk) == []  # not taken for a prefix file either


def test_a_damaged_or_unsigned_snapshot_is_ignored(tmp_path: Path) -> None:
    disk = DiskPromptCache(tmp_path, TOKEN, 1 << 20)
    DiskPromptCache(tmp_path, "another-token-padded-to-32-characters!", 1 << 20).save_snapshot(SNAPSHOT, SLOTS_LAYOUT)
    assert disk.load_snapshot(MODEL_A, SLOTS_LAYOUT, max_tokens=1024) is None
    disk.save_snapshot(SNAPSHOT, SLOTS_LAYOUT)
    path = tmp_path / MODEL_A / "slots.kvs"
    data = path.read_bytes()
    path.write_bytes(data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])
    assert disk.load_snapshot(MODEL_A, SLOTS_LAYOUT, max_tokens=1024) is None


def test_a_snapshot_larger_than_the_bound_is_not_written(tmp_path: Path) -> None:
    assert DiskPromptCache(tmp_path, TOKEN, 100).save_snapshot(SNAPSHOT, SLOTS_LAYOUT) == 0
    assert not (tmp_path / MODEL_A / "slots.kvs").exists()


def test_a_cache_path_that_is_not_a_directory_reads_as_empty(tmp_path: Path) -> None:
    (tmp_path / "kvcache").write_bytes(b"not a directory")
    disk = DiskPromptCache(tmp_path / "kvcache", TOKEN, 1 << 20)
    assert load(disk) == [] and disk.load_snapshot(MODEL_A, LAYOUT, max_tokens=10) is None


VALID = DiskPromptCache(Path("/nonexistent"), TOKEN, 1 << 20).encode(MODEL_A, LAYOUT, prefix(MODEL_A, 7, length=5,
                                                                                           state_bytes=20))


@given(st.binary(max_size=300))
def test_any_bytes_are_refused_with_a_value_error(data: bytes) -> None:
    disk = DiskPromptCache(Path("/nonexistent"), TOKEN, 1 << 20)
    with pytest.raises(ValueError):
        disk.decode(data, MODEL_A, LAYOUT, 4096)


@given(st.integers(0, len(VALID) - 1), st.integers(1, 255), st.integers(0, len(VALID) - 1))
def test_a_valid_file_with_any_byte_changed_or_cut_is_refused(index: int, flip: int, cut: int) -> None:
    disk = DiskPromptCache(Path("/nonexistent"), TOKEN, 1 << 20)
    assert disk.decode(VALID, MODEL_A, LAYOUT, 4096) == prefix(MODEL_A, 7, length=5, state_bytes=20)
    for damaged in (VALID[:index] + bytes([VALID[index] ^ flip]) + VALID[index + 1 :], VALID[:cut]):
        with pytest.raises(ValueError):
            disk.decode(damaged, MODEL_A, LAYOUT, 4096)
