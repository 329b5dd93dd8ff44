"""``optiq lora train --plan``: the measured training ceiling map on the bundled model."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from test_lora_train import _cli

from optiq.train.ceiling import MARGIN, CeilingRow, predict

pytestmark = pytest.mark.slow

GB = 10**9


def test_predict_is_conservative():
    fixed = 1 * GB
    linear = [CeilingRow(128, 0, fixed + GB, 0, 0), CeilingRow(256, 0, fixed + 2 * GB, 0, 0)]
    assert predict(linear, fixed, 512) == pytest.approx(fixed + MARGIN * 4 * GB, rel=1e-6)
    quadratic = [CeilingRow(128, 0, fixed + GB, 0, 0), CeilingRow(256, 0, fixed + 4 * GB, 0, 0)]
    assert predict(quadratic, fixed, 512) == pytest.approx(fixed + MARGIN * 16 * GB, rel=1e-6)
    # one measurement: assume quadratic growth; shrinking memory never predicts less than linear
    assert predict(linear[:1], fixed, 256) == pytest.approx(fixed + MARGIN * 4 * GB, rel=1e-6)
    flat = [CeilingRow(128, 0, fixed + GB, 0, 0), CeilingRow(256, 0, fixed + GB, 0, 0)]
    assert predict(flat, fixed, 512) == pytest.approx(fixed + MARGIN * 2 * GB, rel=1e-6)


def _plan(*args: str) -> tuple[list[tuple[int, float]], str]:
    """``optiq lora train --plan`` in a fresh process (its memory baseline is its own):
    the measured (length, peak process GB) rows and the output."""
    out = subprocess.run([sys.executable, "-m", "optiq.cli.main", "lora", "train", "bundled-quant", "--plan",
                          "--batch-size", "1", *args], capture_output=True, text=True, check=True).stdout
    rows = [(int(m[1]), float(m[2])) for m in re.finditer(r"^ +(\d+) +[\d.]+ +([\d.]+) ", out, re.M)]
    return rows, out


def test_map_measures_growing_lengths_and_stops_before_the_budget():
    rows, out = _plan("--max-seq-length", "1024", "--max-memory", "100")
    assert [n for n, _ in rows] == [128, 256, 512, 1024]
    assert rows[3][1] > rows[0][1]  # measured, and longer costs more
    assert "longest sequence length under 100.00 GB: 1024" in out and "--max-seq-length" in out

    # 512 fits; 1024 does not, and the extrapolation from the shorter ones must see it coming
    budget = (rows[2][1] + rows[3][1]) / 2
    rows, out = _plan("--max-seq-length", "1024", "--max-memory", f"{budget:.3f}")
    assert 1024 not in [n for n, _ in rows]
    assert "1024 tokens predicted to peak" in out
    assert re.search(r"longest sequence length under [\d.]+ GB: \d+", out)


def test_cli_plan_options(capsys):
    code, _, err = _cli(["lora", "train", "bundled-quant", "--max-memory", "4"], capsys)
    assert code != 0 and "--max-memory is for --plan" in err
    code, _, err = _cli(["lora", "train", "bundled-quant"], capsys)
    assert code != 0 and "--data DIR is required" in err
