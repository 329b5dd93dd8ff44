"""Bit widths and group sizes: one check for weights (convert) and the KV cache (kv-cache)."""

from __future__ import annotations

import numpy as np
import pytest
from optiq.cli.main import main
from optiq.core.affine import SUPPORTED_BITS, check_bits, check_group_size, parse_bits
from optiq.core.errors import ConfigError


def test_parse_bits():
    assert parse_bits("8, 4,4") == (4, 8)
    assert parse_bits([2, 3, 5, 6]) == (2, 3, 5, 6)
    assert parse_bits((np.int64(8), 4)) == (4, 8)
    assert all(type(b) is int for b in parse_bits((np.int64(8), 4)))
    with pytest.raises(ConfigError, match="candidate bit width 7 cannot be stored: MLX affine quantization takes 2, 3, 4, 5, 6, 8 bits"):
        parse_bits("4,7")
    with pytest.raises(ConfigError, match="candidate bit width 1 cannot be stored"):
        parse_bits("1,4,7")  # the first bad one is named
    with pytest.raises(ConfigError, match="comma-separated integers, got '4,eight'"):
        parse_bits("4,eight")
    with pytest.raises(ConfigError, match="--candidate-bits is empty: give one or more of 2, 3, 4, 5, 6, 8"):
        parse_bits(" , ")
    with pytest.raises(ConfigError, match="cannot be stored"):
        parse_bits([4.5])


def test_check_bits_and_group_size():
    assert [check_bits(b) for b in SUPPORTED_BITS] == list(SUPPORTED_BITS)
    for bad in (True, 7, 16, "4", 4.0):
        with pytest.raises(ConfigError, match="k_bits .* cannot be stored"):
            check_bits(bad, "k_bits")
    assert check_group_size(64) == 64
    for bad in (48, 256, True):
        with pytest.raises(ConfigError, match="is not supported: MLX affine quantization takes 32, 64, 128"):
            check_group_size(bad)


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--candidate-bits", "4,7", "candidate bit width 7 cannot be stored"),
        ("--candidate-bits", "1,4", "candidate bit width 1 cannot be stored"),
        ("--candidate-bits", "4,eight", "comma-separated integers"),
        ("--candidate-bits", ",", "--candidate-bits is empty"),
        ("--group-size", "48", "group size 48 is not supported"),
        ("--group-size", "0", "group size 0 is not supported"),
    ],
)
def test_convert_and_kv_cache_reject_alike(tmp_path, capsys, option, value, words):
    """Both commands store MLX affine codes, so they refuse the same input in the same words
    (before any model is loaded)."""
    weights = _error(["convert", "-o", str(tmp_path / "w"), option, value], capsys)
    kv = _error(["kv-cache", "-o", str(tmp_path / "kv"), option, value], capsys)
    assert weights == kv and words in weights
    assert not (tmp_path / "w").exists() and not (tmp_path / "kv").exists()
