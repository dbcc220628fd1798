"""VisualLayout: static spans, hashing, scopes, refusals."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vskip_compile import LayoutError, VisualLayout
from vskip_compile.layout import spans_from_mask


def test_spans_from_mask_start_end_and_two_images():
    assert spans_from_mask([1, 1, 0, 0, 1, 1, 1]) == ((0, 2), (4, 7))
    assert spans_from_mask([0, 0, 0]) == ()


def test_from_masks_and_queries():
    lay = VisualLayout.from_masks([[0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 1, 0]])
    assert lay.seq_len == 6 and lay.batch_size == 2 and lay.is_uniform
    assert lay.row_spans == ((1, 3), (4, 5))
    assert lay.num_visual == 3 and lay.has_visual
    assert lay.visual_mask() == [False, True, True, False, True, False]
    assert lay.kept_spans() == ((0, 1), (3, 4), (5, 6))


def test_prefix_through_visual_freezes_the_text_before_the_image():
    lay = VisualLayout.single(10, [(2, 4), (5, 7)])
    assert lay.frozen_spans("prefix_through_visual") == ((0, 7),)
    assert lay.kept_spans("prefix_through_visual") == ((7, 10),)


def test_hashable_and_equal_by_value():
    a = VisualLayout.single(8, [(1, 5)])
    b = VisualLayout.from_masks([[0, 1, 1, 1, 1, 0, 0, 0]])
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != VisualLayout.single(8, [(1, 5)], batch_size=2)


def test_zero_images():
    lay = VisualLayout.from_masks([[0, 0, 0]])
    assert not lay.has_visual and lay.num_visual == 0 and lay.kept_spans() == ((0, 3),)


def test_mixed_batch_is_refused_where_one_layout_is_needed():
    lay = VisualLayout.from_masks([[0, 1, 1, 0], [1, 1, 0, 0]])
    assert not lay.is_uniform
    with pytest.raises(LayoutError, match="different visual spans"):
        lay.row_spans


@pytest.mark.parametrize("spans", [[(3, 2)], [(0, 4), (3, 6)], [(5, 12)], [(2, 2)]])
def test_bad_spans_refused(spans):
    with pytest.raises(LayoutError, match="span"):
        VisualLayout.single(10, spans)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=64))
def test_kept_and_frozen_partition_the_rows(mask):
    lay = VisualLayout.from_masks([mask])
    rows = [r for a, b in lay.kept_spans() + lay.frozen_spans() for r in range(a, b)]
    assert sorted(rows) == list(range(len(mask)))
    assert [r for a, b in lay.frozen_spans() for r in range(a, b)] == [i for i, v in enumerate(mask) if v]
