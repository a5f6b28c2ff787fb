"""Row packing and coordinate bookkeeping (``hieravid.runtime.packing``): pure functions against plain loops."""

from __future__ import annotations

import pytest
import torch

from hieravid.runtime.packing import (
    CONTENT,
    NEWLINE,
    TEXT,
    compact,
    gather_positions,
    gather_rows,
    pack_rows,
    translate_mask,
)


def test_compact_lists_true_columns_in_order() -> None:
    mask = torch.tensor([[True, False, True, True, False], [False, False, False, False, True]])
    out = compact(mask, 3)
    assert out[0].tolist() == [0, 2, 3]
    assert out[1].tolist() == [4, 0, 0]  # slots past a row's count hold 0


def test_gather_rows_and_positions_follow_the_index() -> None:
    rows = torch.arange(2 * 5 * 3).view(2, 5, 3)
    index = torch.tensor([[0, 2, 4], [1, 1, 3]])
    gathered = gather_rows(rows, index)
    for b in range(2):
        for k in range(3):
            assert torch.equal(gathered[b, k], rows[b, index[b, k]])
    assert torch.equal(gather_rows(rows[:1], index)[1], rows[0, index[1]])  # [1, S, ...] broadcasts
    positions = torch.arange(5).unsqueeze(0) + 100
    assert gather_positions(positions, index).tolist() == [[100, 102, 104], [101, 101, 103]]
    mrope = torch.stack([positions.expand(2, -1) + r for r in range(3)])  # [3, B, S]
    assert gather_positions(mrope, index)[2].tolist() == [[102, 104, 106], [103, 103, 105]]
    with pytest.raises(ValueError, match="position_ids"):
        gather_positions(torch.zeros(5), index)


def _reference_pack(
    keep: torch.Tensor, kind: torch.Tensor, query_rows: int
) -> tuple[list[list[int]], list[list[bool]]]:
    """Plain loops: the kept rows, then padding slots copying the row before them, inserted after the last video row
    (or before the last ``query_rows`` rows, whichever comes first, never at slot 0)."""
    counts = [int(row.sum()) for row in keep]
    length = max(counts)
    indices, valids = [], []
    for b in range(keep.shape[0]):
        rows = [s for s in range(keep.shape[1]) if keep[b, s]]
        video = [i for i, s in enumerate(rows) if kind[b, s] != TEXT]
        at = len(rows) if not video else video[-1] + 1
        at = max(1, min(at, len(rows) - query_rows))
        pad = length - len(rows)
        indices.append(rows[:at] + [rows[at - 1]] * pad + rows[at:])
        valids.append([True] * at + [False] * pad + [True] * (len(rows) - at))
    return indices, valids


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("query_rows", [1, 3])
def test_pack_rows_matches_a_loop(seed: int, query_rows: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    batch, length = 3, 24
    kind = torch.full((batch, length), TEXT, dtype=torch.int8)
    kind[:, 4:18] = CONTENT
    kind[:, 18] = NEWLINE
    keep = (torch.rand(batch, length, generator=generator) < 0.6) | (kind == TEXT)
    counts = [int(row.sum()) for row in keep]
    index, valid = pack_rows(keep, kind, counts, query_rows)
    expected_index, expected_valid = _reference_pack(keep, kind, query_rows)
    assert index.tolist() == expected_index
    assert valid.tolist() == expected_valid


def test_pack_rows_without_padding_is_compact() -> None:
    keep = torch.tensor([[True, False, True, True]])
    kind = torch.tensor([[TEXT, CONTENT, CONTENT, TEXT]], dtype=torch.int8)
    index, valid = pack_rows(keep, kind, [3], 1)
    assert index.tolist() == [[0, 2, 3]] and valid.all()


def test_translate_mask_keeps_prompt_rows_then_new_tokens() -> None:
    mask2d = torch.tensor([[False, True, True, True, True, True], [True, True, True, True, True, False]])
    orig = torch.tensor([[1, 3, 3], [0, 2, 3]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    out = translate_mask(mask2d, 4, orig, valid)  # 4 prompt positions, then 2 new tokens
    assert out.tolist() == [[True, True, False, True, True], [True, True, True, True, False]]
