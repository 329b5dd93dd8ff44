#!/usr/bin/env python3
"""Build the bundled model's OptiQ quant (``optiq-tiny-optiq``) shipped in optiq-core.

    uv run python tools/build_bundled_quant.py            # (re)write the shipped quant
    uv run python tools/build_bundled_quant.py --check    # rebuild in a temp dir, compare

It runs the library call behind ``optiq convert`` (``optiq.core.quant.convert.convert``) on
the bundled float model ``optiq-tiny`` with these fixed settings (the ``optiq convert``
defaults, spelled out so a change of defaults does not silently change the asset):

* target 4.5 bits per weight, counted over quantized weights (``bpw_kind="weights"``);
* candidate bits 3, 4, 5, 6, 8, so the adapted layers of a LoRA run span several widths
  and ``optiq lora train --rank-scaling by_bits`` has something to follow;
* group size 64, MLX affine format, GPTQ rounding;
* ``method="optiq"``, ``estimator="fisher"``: measured KL sensitivities (Fisher estimates,
  the largest ones measured exactly);
* calibration: the bundled calibration set, 8 sequences x 256 tokens;
* no sensitivity plot (keeps the asset small), no resume.

Determinism: the calibration shuffle and the Fisher probe vectors use convert's fixed seed
0 and MLX's global seed is set to 0 here, so the weights and ``config.json`` come out
byte-identical on every run on the same platform. Two fields of ``optiq_metadata.json``
are made portable afterwards: ``source_model`` becomes the bundled name ``optiq-tiny``
(convert writes an absolute path of the build machine) and the wall-clock ``seconds``
are dropped. ``--check`` rebuilds into a temporary directory and compares every file.

The result (~1.6 MB) loads with stock ``mlx_lm.load`` and ``optiq.core.model_io.load_model``
("bundled-quant"); ``optiq lora train`` uses it when no MODEL is given.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
import tempfile
from pathlib import Path

import optiq.core  # noqa: F401  (preloads OpenBLAS before mlx is imported)

import mlx.core as mx

from optiq.core.model_io import BUNDLED_MODEL_NAME, bundled_model_path, bundled_quant_path, load_model
from optiq.core.quant.convert import convert

SETTINGS = dict(
    target_bpw=4.5,
    bpw_kind="weights",
    candidate_bits=(3, 4, 5, 6, 8),
    group_size=64,
    rounding="gptq",
    method="optiq",
    estimator="fisher",
    calibration=None,  # the bundled calibration set
    n_calibration=8,
    seq_len=256,
)
SEED = 0


def build(out: Path) -> None:
    """Convert the bundled model into ``out`` and make its metadata portable."""
    mx.random.seed(SEED)
    result = convert(bundled_model_path(), out, force=True, resume=False, plot=False, **SETTINGS)
    meta_file = out / "optiq_metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["source_model"] = BUNDLED_MODEL_NAME
    meta.pop("seconds", None)
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    hist = ", ".join(f"{b}-bit {n}" for b, (n, _) in result.bits_histogram().items())
    print(f"wrote {out}: {result.weight_bpw:.3f} bpw ({hist} layers), {result.size_bytes:,} bytes of weights")


def verify(out: Path) -> None:
    """The quant must load with stock mlx-lm and with OptiQ's loader."""
    from mlx_lm import load

    load(str(out))
    lm = load_model(out)
    q = lm.config["quantization"]
    bits = {v["bits"] for v in q.values() if isinstance(v, dict)}
    if len(bits) < 2:
        sys.exit(f"{out}: expected per-layer mixed bits in config.json, got {sorted(bits)}")
    print(f"loads with mlx_lm.load and optiq load_model; per-layer bits {sorted(bits)}")


def check(shipped: Path) -> None:
    """Rebuild into a temp dir and compare with ``shipped`` file by file."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / shipped.name
        build(fresh)
        names = sorted({p.name for p in shipped.iterdir()} | {p.name for p in fresh.iterdir()})
        _, mismatch, errors = filecmp.cmpfiles(shipped, fresh, names, shallow=False)
    if mismatch or errors:
        sys.exit(f"{shipped} differs from a fresh build: {', '.join(mismatch + errors)}")
    print(f"{shipped} matches a fresh build ({len(names)} files)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=bundled_quant_path(), help="output directory")
    ap.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    args = ap.parse_args()
    if args.check:
        check(args.out)
        return
    build(args.out)
    verify(args.out)


if __name__ == "__main__":
    main()
