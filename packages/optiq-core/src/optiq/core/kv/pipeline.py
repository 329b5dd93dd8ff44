"""``optiq kv-cache`` as a library call: check, measure, allocate, verify, write.

Every argument is checked before the model is run, so bad input fails in seconds:
unsupported candidate widths or rotation, a group size that does not divide head_dim, a model with
no KV-carrying layer, a target below what the candidates can store, or calibration
text shorter than one sequence.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..affine import check_group_size, parse_bits
from ..calibration import BUNDLED_CALIBRATION, build_calibration, read_text_file
from ..errors import ConfigError, DataError
from . import quant

DEFAULT_SEQ_LEN = 512
DEFAULT_N_SAMPLES = 4
CONFIG_NAME = "kv_config.json"
SENSITIVITY_NAME = "kv_sensitivity.json"
PLOT_NAME = "kv_sensitivity.png"


@dataclass
class KVCacheRun:
    config: object  # KVConfig
    sensitivity: object  # KVSensitivity
    measured: dict[str, float]  # measured KL of whole configs (chosen, uniform lowest/highest)
    files: dict[str, Path]
    seconds: float


def calibration_tokens(tokenizer, data: str | Path | None, model_path: Path, n_samples: int, seq_len: int):
    """``[n, seq_len]`` calibration tokens and a description of their source.

    ``data``: a ``.jsonl`` calibration file (the format ``optiq convert`` uses: ``text``
    or chat ``messages`` records) or a plain-text file. Default: the bundled calibration
    set shared with ``optiq convert``, else ``calibration.txt`` in the model directory.
    (Held-out text is left to evaluation.)
    """
    import mlx.core as mx

    if data is None:
        local = Path(model_path) / "calibration.txt"
        if BUNDLED_CALIBRATION.exists():
            cs = build_calibration(tokenizer, None, n_samples, seq_len)
            return mx.array(cs.tokens), f"bundled calibration set ({BUNDLED_CALIBRATION.name})"
        if local.exists():
            data = local
        else:
            raise DataError("no calibration data found: pass --data FILE (.jsonl records or plain text)")
    path = Path(data).expanduser()
    if path.suffix == ".jsonl":
        cs = build_calibration(tokenizer, path, n_samples, seq_len)
        return mx.array(cs.tokens), str(path)
    from .sensitivity import calibration_sequences

    return calibration_sequences(tokenizer, read_text(path), n_samples, seq_len, source=f"text {path}"), str(path)


def read_text(path: Path) -> str:
    """A plain-text calibration file; a missing, unreadable or empty one is a :class:`DataError`."""
    text = read_text_file(Path(path), "calibration file")
    if not text.strip():
        raise DataError(f"calibration file {path} is empty")
    return text


def _fast_prefill() -> contextlib.AbstractContextManager:
    """The chunked Gated DeltaNet recurrence (fast CPU calibration)."""
    from ..quant.gdn import fast_gated_delta

    return fast_gated_delta()


def run_kv_cache(
    model: str | Path | None,
    out_dir: str | Path,
    target_bits: float = 4.5,
    candidate_bits: str | tuple[int, ...] = (4, 8),
    group_size: int = 64,
    seq_len: int = DEFAULT_SEQ_LEN,
    n_samples: int = DEFAULT_N_SAMPLES,
    data: str | Path | None = None,
    log: Callable[[str], None] = lambda s: None,
    progress: Callable[[str], None] | None = None,
    rotation: str = "hadamard",
) -> KVCacheRun:
    """Measure KV sensitivity of ``model``, allocate bits, write config, data and plot.

    ``rotation`` is how the cache will store K/V (see :mod:`.quant`); it is measured with
    and recorded in the config, so the sensitivities match what the cache does.
    ``progress`` receives one line per decoder block and per sequence of each pass
    (``sensitivity: block 7 of 24 ...``), for a log.
    """
    from ..model_io import load_model, validate_model_dir
    from .allocate import allocate_kv_bits, min_achievable_bits
    from .config import KVConfig, head_dims, save_kv_config
    from .layers import kv_layout, require_kv_layers
    from .plot import plot_kv_sensitivity
    from .sensitivity import measure_kv_sensitivity, variant_kls

    tic = time.perf_counter()
    # --- argument checks that need nothing loaded
    cands = parse_bits(candidate_bits)
    quant.check_rotation(rotation)
    check_group_size(group_size)
    if not isinstance(target_bits, (int, float)) or not math.isfinite(target_bits) or target_bits <= 0:
        raise ConfigError(f"--target-bits must be a positive number, got {target_bits!r}")
    lowest = min_achievable_bits(cands, group_size)
    if target_bits + 1e-9 < lowest:
        raise ConfigError(
            f"--target-bits {target_bits} is below what the candidates can store: {min(cands)}-bit K/V with "
            f"group size {group_size} takes {lowest:g} bits per element (codes + fp16 scale and bias)"
        )
    if seq_len < 16:
        raise ConfigError(f"--seq-len must be at least 16, got {seq_len}")
    if n_samples < 1:
        raise ConfigError(f"--n-samples must be at least 1, got {n_samples}")
    path, _ = validate_model_dir(model)
    if data is not None and not Path(data).expanduser().is_file():
        raise DataError(f"calibration file {data} does not exist")

    # --- model-dependent checks (cheap: load + one probe token)
    lm = load_model(path)
    layout = kv_layout(lm.model)
    require_kv_layers(layout)
    quant.check_group_divides(group_size, head_dims(layout))
    sequences, source = calibration_tokens(lm.tokenizer, data, path, n_samples, seq_len)
    n_samples = int(sequences.shape[0])
    log(f"model: {path} ({layout.describe()})")
    for s in layout.skipped:
        log(f"  skipped layer {s.index}: {s.cache}, {s.reason}")
    log(f"calibration: {n_samples} x {seq_len} tokens from {source}")
    log(f"K/V rotation: {rotation}")

    # --- sensitivity
    # The chosen config is measured as a whole (no additivity assumption), next to the
    # uniform configs at the lowest and highest candidate widths; those do not depend on
    # the allocation, so they run in the sensitivity pass itself (sharing its reference).
    uniform = {
        f"uniform_{b}bit": {kv.index: (b, b) for kv in layout.kv_layers} for b in (min(cands), max(cands))
    }
    with _fast_prefill():
        sens = measure_kv_sensitivity(
            lm.model, sequences, layout, cands, group_size, rotation=rotation, log=progress,
            whole_configs=uniform,
        )
        alloc = allocate_kv_bits(sens, layout, target_bits, cands, group_size)
        measured = dict(sens.extra["measured_kl_of_whole_configs"])
        same = next((name for name, bits in uniform.items() if bits == alloc.bits), None)
        t_checks = time.perf_counter()
        if same is not None:  # e.g. 4.5 bits with 4/8-bit candidates: uniform 4-bit
            chosen_kl = measured[same]
        else:
            (chosen_kl,) = variant_kls(
                lm.model, sequences, [alloc.bits], group_size, layout.vocab_size, rotation=rotation,
                log=progress, stage="chosen config",
            )
        t_checks = time.perf_counter() - t_checks
    measured = {"chosen": chosen_kl, **measured}

    config = KVConfig(
        model=layout,
        group_size=group_size,
        layers=alloc.bits,
        target_bits=float(target_bits),
        candidate_bits=cands,
        model_name=Path(path).name,
        rotation=rotation,
        extra={
            "predicted_kl": alloc.predicted_kl,
            "measured_kl": measured["chosen"],
            "calibration": {"data": source, "n_samples": n_samples, "seq_len": seq_len},
            "created_by": "optiq kv-cache",
        },
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"config": save_kv_config(config, out / CONFIG_NAME)}
    sens.extra = {
        "measured_kl_of_whole_configs": measured,
        "seconds_chosen_config": round(t_checks, 2),  # 0: it is one of the uniform configs
        "seconds_total": None,
    }
    files["sensitivity"] = out / SENSITIVITY_NAME
    files["plot"] = plot_kv_sensitivity(
        sens, out / PLOT_NAME, chosen=alloc.bits, title=f"KV sensitivity: {Path(path).name}"
    )
    seconds = time.perf_counter() - tic
    sens.extra["seconds_total"] = round(seconds, 2)
    files["sensitivity"].write_text(json.dumps(sens.to_dict(), indent=2) + "\n")
    return KVCacheRun(config=config, sensitivity=sens, measured=measured, files=files, seconds=seconds)
