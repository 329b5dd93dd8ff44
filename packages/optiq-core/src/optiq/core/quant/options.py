"""Everything one ``optiq convert`` run is asked to do, checked before any weight is read."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..affine import check_group_size, parse_bits
from ..calibration import DEFAULT_N_CALIBRATION, DEFAULT_SEQ_LEN
from ..errors import ConfigError
from .allocate import check_target
from .fisher import ESTIMATE_ROUNDING
from .rounding import ROUNDING_METHODS
from .sensitivity import MEASURE_FLOOR

METHODS = ("optiq", "static")
ESTIMATORS = ("fisher", "measured")
# A spread of widths lets the allocation trade 3-bit layers for 5/6/8-bit ones at equal size;
# on the bundled model that halves the KL of a 4/8-only allocation at the same budget.
DEFAULT_CANDIDATE_BITS = (3, 4, 5, 6, 8)
# Fisher estimates at or above this (nats) are re-measured by forward passes (one full
# forward per leaf and width). Off by default: with RTN estimate errors, measuring the large
# ones did not improve held-out KL on the bundled model (benchmarks/convert_quality.py), and
# it costs as much as the whole estimate per pass. Pass e.g. 0.02 to turn it on.
MEASURE_ABOVE = float("inf")
# Bytes of vocabulary-sized temporaries (logit tiles) the streamed head may use at once.
DEFAULT_HEAD_TILE_MB = 256


@dataclass(frozen=True)
class ConvertOptions:
    """One convert request. Build with :meth:`checked` (parses and validates)."""

    model: str | Path | None
    out_dir: Path
    target_bpw: float = 4.5
    candidate_bits: tuple[int, ...] = DEFAULT_CANDIDATE_BITS
    group_size: int = 64
    calibration: str | Path | None = None
    n_calibration: int = DEFAULT_N_CALIBRATION
    seq_len: int = DEFAULT_SEQ_LEN
    method: str = "optiq"
    force: bool = False
    bpw_kind: str = "weights"
    rounding: str | None = None  # None: gptq for optiq, clip for static
    batch_size: int = 8
    estimator: str = "fisher"
    n_probes: int = 1
    measure_above: float = MEASURE_ABOVE
    measure_floor: float = MEASURE_FLOOR
    estimate_rounding: str | None = None
    sensitivities_file: str | Path | None = None
    resume: bool = True
    plot: bool = True
    max_memory_gb: float | None = None  # None: the memory available when the run starts
    head_tile_mb: int = DEFAULT_HEAD_TILE_MB

    @classmethod
    def checked(cls, model: str | Path | None, out_dir: str | Path, **kw: Any) -> "ConvertOptions":
        """Parse and validate every option that can be checked without the model."""
        opts = cls(model=model, out_dir=Path(out_dir).expanduser(), **kw)
        if opts.method not in METHODS:
            raise ConfigError(f"unknown --method '{opts.method}': use 'optiq' or 'static'")
        if opts.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown estimator '{opts.estimator}': use 'fisher' or 'measured'")
        bits = parse_bits(opts.candidate_bits)
        check_group_size(opts.group_size)
        check_target(float(opts.target_bpw), bits, opts.bpw_kind)
        rounding = opts.rounding or ("gptq" if opts.method == "optiq" else "clip")
        if rounding not in ROUNDING_METHODS:
            raise ConfigError(f"unknown rounding '{rounding}': use one of {', '.join(ROUNDING_METHODS)}")
        if opts.estimate_rounding is not None and opts.estimate_rounding not in ROUNDING_METHODS:
            raise ConfigError(
                f"unknown estimate rounding '{opts.estimate_rounding}': use one of {', '.join(ROUNDING_METHODS)}"
            )
        if opts.method == "static" and rounding == "gptq":
            raise ConfigError("--method static runs no forward passes, so it cannot use GPTQ rounding: use clip or rtn")
        if opts.n_calibration < 1:
            raise ConfigError("--n-calibration must be at least 1")
        if opts.seq_len < 8:
            raise ConfigError("--seq-len must be at least 8")
        if opts.max_memory_gb is not None and opts.max_memory_gb <= 0:
            raise ConfigError("--max-memory must be a positive number of GB")
        if opts.head_tile_mb < 16:
            raise ConfigError("--head-tile-mb must be at least 16")
        return replace(opts, candidate_bits=bits, rounding=rounding, target_bpw=float(opts.target_bpw))

    @property
    def est_rounding(self) -> str:
        """The fake-quantization sensitivities are computed with."""
        return self.estimate_rounding or (ESTIMATE_ROUNDING if self.estimator == "fisher" else str(self.rounding))

    @property
    def streamed_estimate(self) -> bool:
        """The default estimate (fisher, RTN errors, nothing re-measured) runs block by block;
        the others need the whole model in fp32."""
        return self.estimator == "fisher" and self.est_rounding == "rtn" and self.measure_above == float("inf")
