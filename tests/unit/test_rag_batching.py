"""How the embedder cuts texts into padded batches: every row once, no batch too big, least padded compute."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from rag.embedding import length_batches


def _cost(lengths: list[int], groups: list[list[int]], run_cost: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + run_cost for g in groups)


@given(
    lengths=st.lists(st.integers(1, 512), max_size=200),
    max_rows=st.integers(1, 64),
    run_cost=st.integers(0, 100),
)
@example(lengths=[205, 76, 197, 205, 71], max_rows=32, run_cost=16)  # one bench document's chunks
def test_every_row_once_in_batches_no_costlier_than_fixed_slices(
    lengths: list[int], max_rows: int, run_cost: int
) -> None:
    groups = length_batches(lengths, max_rows, run_cost)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(1 <= len(g) <= max_rows for g in groups)
    # What the embedder did before: fixed slices of the rows sorted longest first.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    slices = [order[s : s + max_rows] for s in range(0, len(order), max_rows)]
    assert _cost(lengths, groups, run_cost) <= _cost(lengths, slices, run_cost)


def test_a_document_s_short_tails_are_not_padded_to_its_full_windows() -> None:
    lengths = [205, 76, 197, 205, 71]
    assert length_batches(lengths, 32, 16) == [[0, 3, 2], [1, 4]]
    assert length_batches(lengths, 32, 10_000) == [[0, 3, 2, 1, 4]]  # a costly run: one batch
    assert length_batches([], 32, 16) == []
