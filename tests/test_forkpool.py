"""fork_map: results in order (or as they finish), closures reach the workers by fork, errors come back."""

from __future__ import annotations

import pytest

from vskip_compile.forkpool import fork_map


class _Unpicklable:
    """Stands in for a model: a Pool would have to pickle it with every task."""

    def __init__(self):
        self.offset = 10
        self.lock = __import__("threading").Lock()  # locks do not pickle


def test_results_in_order_and_unordered():
    big = _Unpicklable()
    assert list(fork_map(lambda x: x * x + big.offset, range(7), workers=2, init=lambda: None)) == [
        x * x + 10 for x in range(7)]
    assert sorted(fork_map(lambda x: -x, range(5), workers=3, ordered=False, init=lambda: None)) == [-4, -3, -2, -1, 0]


def test_a_worker_error_is_raised_here():
    def fn(x):
        if x == 3:
            raise KeyError("boom")
        return x

    with pytest.raises(KeyError, match="boom"):
        list(fork_map(fn, range(6), workers=2, init=lambda: None))
