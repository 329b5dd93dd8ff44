"""How token windows are cut, for calibration (convert, kv-cache) and evaluation alike."""

from __future__ import annotations

import numpy as np
import pytest
from optiq.core.calibration import cut_windows
from optiq.core.errors import DataError


def test_exact_length_cuts_consecutive_windows():
    ids = list(range(12))
    got = cut_windows(ids, 3, 4, "x")
    assert got.dtype == np.int32 and np.array_equal(got, np.arange(12).reshape(3, 4))


def test_windows_spread_from_first_to_last_token():
    ids = list(range(100))
    got = cut_windows(ids, 3, 10, "x")
    assert got[0, 0] == 0 and got[-1, -1] == 99 and got[1, 0] == 45
    assert np.array_equal(cut_windows(ids, 1, 10, "x"), np.arange(10)[None])
    assert cut_windows(list(range(12)), 4, 10, "x").shape == (4, 10)  # overlap when asked for more


def test_too_few_tokens_names_the_source():
    with pytest.raises(DataError, match="calibration text t.txt has 5 tokens, fewer than one window of 8: "
                                        "give more text or a smaller --seq-len"):
        cut_windows([1, 2, 3, 4, 5], 2, 8, "calibration text t.txt")
