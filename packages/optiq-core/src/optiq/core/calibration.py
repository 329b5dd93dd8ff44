"""Calibration data: the bundled offline set or a user jsonl, tokenized into sequences.

A calibration file is JSON Lines; each record is either ``{"text": "..."}`` (rendered
as is) or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with the
model's chat template, so the measurement sees the model's real chat format, thinking
blocks included). Records are shuffled with a fixed seed (so the first sequences already
mix prose, chat, code and tool calls), joined with the tokenizer's EOS token and cut into
``n`` sequences of ``seq_len`` tokens by :func:`cut_windows`, the one rule by which
calibration (``optiq convert``, ``optiq kv-cache``) and evaluation cut token windows.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DataError

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_CALIBRATION = DATA_DIR / "calibration.jsonl"
DEFAULT_SEQ_LEN = 256
DEFAULT_N_CALIBRATION = 8


def _check_messages(msgs: Any, where: str) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: message {j} needs a string 'role'")
        if not isinstance(m.get("content", ""), str):
            raise DataError(f"{where}: message {j} 'content' must be a string")


def read_text_file(p: Path, what: str) -> str:
    """The UTF-8 text of ``p``; a missing, non-regular or unreadable file is a
    :class:`DataError` naming ``what`` it was meant to be."""
    if not p.exists():
        raise DataError(f"{what} {p} does not exist")
    if not p.is_file():
        raise DataError(f"{what} {p} is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {p}: {e}") from None


def load_records(path: str | Path, what: str = "calibration file") -> list[dict[str, Any]]:
    """Read and validate a jsonl of text/messages records; every problem is a :class:`DataError`."""
    p = Path(path).expanduser()
    raw = read_text_file(p, what)
    records = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: each line must be a JSON object")
        if "messages" in rec:
            _check_messages(rec["messages"], where)
        elif isinstance(rec.get("text"), str):
            if not rec["text"].strip():
                continue
        else:
            raise DataError(f"{where}: a record needs a string 'text' or a 'messages' list")
        records.append(rec)
    if not records:
        raise DataError(f"{what} {p} has no records")
    return records


def _has_chat_template(tokenizer: Any) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)  # mlx-lm's TokenizerWrapper
    if isinstance(flag, bool):
        return flag
    return bool(getattr(tokenizer, "chat_template", None))


def render_record(rec: dict[str, Any], tokenizer: Any, where: str = "a chat record") -> str:
    """The text of one record; chat records go through the model's chat template.

    A chat the template cannot render is a :class:`DataError`: measuring on some other
    rendering than the one the model will see would change the result without a word.
    """
    if "messages" not in rec:
        return rec["text"]
    msgs = [{k: v for k, v in m.items()} for m in rec["messages"]]
    fix = 'give it as a {"text": ...} record to calibrate on plain text'
    if not _has_chat_template(tokenizer):
        raise DataError(f"{where}: 'messages' records need a chat template, and this model's tokenizer has none; {fix}")
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception as e:  # jinja raise_exception(), bad roles, ...: the template rejected it
        raise DataError(
            f"{where}: the model's chat template rejected this conversation ({type(e).__name__}: {e}); "
            f"fix the record or {fix}"
        ) from None


def cut_windows(ids: Sequence[int], n: int, length: int, source: str) -> np.ndarray:
    """``n`` windows of ``length`` tokens spread evenly over ``ids``, first to last token,
    as ``[n, length]`` int32; exactly ``n * length`` tokens cut into consecutive windows.

    Shorter ``ids`` than one window is a :class:`DataError` naming ``source``.
    """
    if len(ids) < length:
        raise DataError(
            f"{source} has {len(ids)} tokens, fewer than one window of {length}: "
            "give more text or a smaller --seq-len"
        )
    span = len(ids) - length
    starts = [round(span * i / (n - 1)) if n > 1 else 0 for i in range(n)]
    return np.array([ids[s : s + length] for s in starts], dtype=np.int32)


@dataclass
class CalibrationSet:
    """Token sequences for calibration and where they came from."""

    tokens: np.ndarray  # [n, seq_len] int32
    source: str
    records: int
    available_sequences: int

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokens.tobytes()).hexdigest()[:16]


def build_calibration(
    tokenizer: Any,
    path: str | Path | None = None,
    n_sequences: int = DEFAULT_N_CALIBRATION,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    records: list[dict[str, Any]] | None = None,
) -> CalibrationSet:
    """Tokenize calibration records into ``[n_sequences, seq_len]`` (fewer if the data is short)."""
    if n_sequences < 1:
        raise DataError("the number of calibration sequences must be at least 1")
    if seq_len < 8:
        raise DataError("calibration sequence length must be at least 8 tokens")
    src = Path(path) if path is not None else BUNDLED_CALIBRATION
    recs = records if records is not None else load_records(src)
    order = list(range(len(recs)))
    random.Random(seed).shuffle(order)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    need = n_sequences * seq_len
    for i in order:
        text = render_record(recs[i], tokenizer, f"{src}: chat record {i + 1}")
        ids.extend(tokenizer.encode(text))
        if eos is not None:
            ids.append(int(eos))
        if len(ids) >= need:
            break
    available = len(ids) // seq_len
    n = max(1, min(n_sequences, available))
    arr = cut_windows(ids[: n * seq_len], n, seq_len, f"calibration data {src}")  # consecutive windows
    return CalibrationSet(
        tokens=arr,
        source="bundled" if path is None else str(src),
        records=len(recs),
        available_sequences=available,
    )
