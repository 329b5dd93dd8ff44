"""Training data: ``train.jsonl`` / ``valid.jsonl`` records, tokenized and checked up front.

Three record kinds, chosen per line:

* ``{"text": ...}`` – plain text, trained on every token (EOS appended).
* ``{"messages": [...]}`` – a chat, rendered with the model's chat template. Thinking-aware:
  an assistant ``reasoning_content`` (or ``thinking``/``reasoning``) field, or a
  ``<think>`` block in its content, renders the chat with ``enable_thinking=True``; a chat
  without reasoning renders with ``enable_thinking=False`` (the template's empty think block).
* ``{"prompt": ..., "completion": ...}`` – a user/assistant chat when the tokenizer has a
  chat template, else the two texts concatenated.

With prompt masking only the final assistant turn (or the completion) is trained on.
Every problem is reported with ``file:line``; nothing is dropped without being counted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from optiq.core.errors import DataError

LONG_RECORD_POLICIES = ("error", "truncate", "skip")
THINK_KEYS = ("reasoning_content", "thinking", "reasoning")
PAD_MULTIPLE = 32


@dataclass(frozen=True)
class Record:
    tokens: tuple[int, ...]
    offset: int  # tokens before this index are prompt: not trained on
    where: str  # "file:line"
    kind: str  # text | chat | completion

    @property
    def trained_tokens(self) -> int:
        return len(self.tokens) - max(self.offset, 1)


@dataclass
class Dataset:
    """Tokenized records of one jsonl file, with counts of everything not used as is."""

    path: Path
    records: list[Record]
    kinds: dict[str, int] = field(default_factory=dict)
    blank_lines: int = 0
    truncated: int = 0
    skipped_long: int = 0
    skipped_no_target: int = 0
    mask_fallbacks: int = 0

    def __len__(self) -> int:
        return len(self.records)

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.records)

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        parts = [f"{self.path.name}: {len(self.records)} records ({kinds}), {self.tokens} tokens"]
        for count, what in (
            (self.blank_lines, "blank lines ignored"),
            (self.truncated, "records truncated to --max-seq-length"),
            (self.skipped_long, "records longer than --max-seq-length skipped"),
            (self.skipped_no_target, "records skipped: no token left to train on after masking"),
            (self.mask_fallbacks, "chats whose prompt rendering is not a prefix of the full chat "
             "(masked up to the common prefix)"),
        ):
            if count:
                parts.append(f"{count} {what}")
        return "; ".join(parts)


class _Line(DataError):
    """A problem with one line; the loader adds the file and line number."""


def _has_chat_template(tokenizer: Any) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)  # mlx-lm's TokenizerWrapper
    if isinstance(flag, bool):
        return flag
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool, thinking: bool,
            tools: Any = None) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=generation_prompt,
            enable_thinking=thinking,
            tokenize=False,
        )
    except Exception as e:  # jinja errors: the template rejected the messages
        raise _Line(f"the chat template rejected this record ({type(e).__name__}: {e})") from None
    return _encode(tokenizer, text)


def _normalize_messages(messages: Any) -> tuple[list[dict], bool]:
    """Validated copies of chat messages; True if the last assistant turn has reasoning."""
    if not isinstance(messages, list) or not messages:
        raise _Line('"messages" must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Line(f'message {i} must be an object with a string "role"')
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _Line(f'message {i}: "content" must be a string')
        if content is None and not m.get("tool_calls"):
            raise _Line(f'message {i} has no "content"')
        m = dict(m)
        for key in THINK_KEYS[1:]:
            if key in m and "reasoning_content" not in m:
                m["reasoning_content"] = m.pop(key)
        out.append(m)
    last = out[-1]
    thinking = last["role"] == "assistant" and bool(
        last.get("reasoning_content") or (isinstance(last.get("content"), str) and "<think>" in last["content"])
    )
    return out, thinking


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def tokenize_record(record: Any, tokenizer: Any, mask_prompt: bool) -> tuple[list[int], int, str, bool]:
    """(tokens, prompt_offset, kind, mask_fallback) of one parsed jsonl record."""
    if not isinstance(record, dict):
        raise _Line(
            'expected a JSON object with "text", "messages" or "prompt"/"completion", '
            f"got {type(record).__name__}"
        )
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise _Line('"prompt" and "completion" must both be present and be strings')
        if not completion:
            raise _Line('"completion" is empty: nothing to train on')
        if _has_chat_template(tokenizer):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return _chat(messages, tokenizer, mask_prompt, record.get("tools"), "completion")
        p = _encode(tokenizer, prompt)
        tokens = p + _encode(tokenizer, completion)
        if tokenizer.eos_token_id is not None and tokens[-1] != tokenizer.eos_token_id:
            tokens.append(tokenizer.eos_token_id)
        return tokens, len(p) if mask_prompt else 0, "completion", False
    if "messages" in record:
        messages, _ = _normalize_messages(record["messages"])
        return _chat(messages, tokenizer, mask_prompt, record.get("tools"), "chat")
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise _Line('"text" must be a string')
        if not text.strip():
            raise _Line('"text" is empty')
        if mask_prompt:
            raise _Line(
                '--mask-prompt needs "messages" or "prompt"/"completion" records; this is a '
                '"text" record (it has no prompt to mask)'
            )
        tokens = _encode(tokenizer, text)
        if tokenizer.eos_token_id is not None and (not tokens or tokens[-1] != tokenizer.eos_token_id):
            tokens.append(tokenizer.eos_token_id)
        return tokens, 0, "text", False
    keys = ", ".join(sorted(record)) or "none"
    raise _Line(f'record has none of "text", "messages", "prompt"/"completion" (keys: {keys})')


def _chat(messages: list[dict], tokenizer: Any, mask_prompt: bool, tools: Any, kind: str):
    if not _has_chat_template(tokenizer):
        raise _Line(f"{kind} records need a chat template, and this model's tokenizer has none")
    messages, thinking = _normalize_messages(messages)
    tokens = _render(tokenizer, messages, generation_prompt=False, thinking=thinking, tools=tools)
    if not mask_prompt:
        return tokens, 0, kind, False
    if messages[-1]["role"] != "assistant":
        raise _Line("--mask-prompt needs the last message to be the assistant's (the turn to learn)")
    prompt = _render(tokenizer, messages[:-1], generation_prompt=True, thinking=thinking, tools=tools)
    n = _common_prefix(prompt, tokens)
    return tokens, n, kind, n != len(prompt)


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line; blank lines yield (n, None)."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                yield n, None
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            except UnicodeDecodeError:  # pragma: no cover - open() decodes lazily
                raise DataError(f"{path}:{n}: not valid UTF-8") from None


def load_jsonl(
    path: Path,
    tokenizer: Any,
    *,
    max_seq_length: int,
    mask_prompt: bool = False,
    long_records: str = "error",
) -> Dataset:
    """Tokenize every record of ``path``; raise :class:`DataError` with file:line on problems."""
    if long_records not in LONG_RECORD_POLICIES:
        raise DataError(f"--long-records must be one of {', '.join(LONG_RECORD_POLICIES)}")
    if max_seq_length < 2:
        raise DataError(f"--max-seq-length must be at least 2, got {max_seq_length}")
    path = Path(path)
    ds = Dataset(path=path, records=[])
    seen = 0
    for n, record in read_jsonl(path):
        if record is None:
            ds.blank_lines += 1
            continue
        seen += 1
        where = f"{path}:{n}"
        try:
            tokens, offset, kind, fallback = tokenize_record(record, tokenizer, mask_prompt)
        except _Line as e:
            raise DataError(f"{where}: {e}") from None
        ds.kinds[kind] = ds.kinds.get(kind, 0) + 1
        ds.mask_fallbacks += fallback
        if len(tokens) > max_seq_length:
            if long_records == "error":
                raise DataError(
                    f"{where}: record has {len(tokens)} tokens, more than --max-seq-length "
                    f"{max_seq_length}; raise --max-seq-length, split the record, or pass "
                    "--long-records truncate (or skip)"
                )
            if long_records == "skip":
                ds.skipped_long += 1
                continue
            tokens = tokens[:max_seq_length]
            ds.truncated += 1
        if len(tokens) - max(offset, 1) < 1:
            ds.skipped_no_target += 1
            continue
        ds.records.append(Record(tuple(tokens), offset, where, kind))
    if seen == 0:
        raise DataError(f"{path} is empty: it needs one JSON record per line")
    if not ds.records:
        raise DataError(f"{path}: no usable record ({ds.summary()})")
    return ds


def load_data_dir(
    data_dir: Path,
    tokenizer: Any,
    *,
    max_seq_length: int,
    mask_prompt: bool = False,
    long_records: str = "error",
) -> tuple[Dataset, Dataset | None]:
    """``DIR/train.jsonl`` (required) and ``DIR/valid.jsonl`` (optional)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    train_file = data_dir / "train.jsonl"
    if not train_file.exists():
        raise DataError(f"{data_dir} has no train.jsonl (one JSON record per line)")
    kw = dict(max_seq_length=max_seq_length, mask_prompt=mask_prompt, long_records=long_records)
    train = load_jsonl(train_file, tokenizer, **kw)
    valid_file = data_dir / "valid.jsonl"
    valid = load_jsonl(valid_file, tokenizer, **kw) if valid_file.exists() else None
    return train, valid


# ---------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class Batch:
    inputs: np.ndarray  # [B, T] int32
    targets: np.ndarray  # [B, T] int32
    mask: np.ndarray  # [B, T] float32: 1 where the target token is trained on
    tokens: int  # input tokens that are not padding

    @property
    def trained_tokens(self) -> int:
        return int(self.mask.sum())


def batch_groups(records: list[Record], batch_size: int) -> list[list[int]]:
    """Record indices grouped by length (less padding); the last group may be smaller."""
    order = sorted(range(len(records)), key=lambda i: len(records[i].tokens))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def make_batch(records: list[Record], max_seq_length: int, pad_id: int = 0) -> Batch:
    longest = max(len(r.tokens) for r in records)
    width = min(1 + PAD_MULTIPLE * math.ceil((longest - 1) / PAD_MULTIPLE), max_seq_length)
    width = max(width, longest)
    arr = np.full((len(records), width), pad_id, np.int32)
    mask = np.zeros((len(records), width - 1), np.float32)
    real = 0
    for j, r in enumerate(records):
        n = len(r.tokens)
        arr[j, :n] = r.tokens
        # target position t predicts token t+1; train on tokens offset..n-1
        mask[j, max(r.offset, 1) - 1 : n - 1] = 1.0
        real += n - 1
    return Batch(arr[:, :-1], arr[:, 1:], mask, real)


def train_batch_at(step: int, groups: list[list[int]], seed: int) -> list[int]:
    """Record indices of training step ``step`` (1-based): a pure function, so resuming
    from a checkpoint replays the exact same data order."""
    n = len(groups)
    epoch, pos = divmod(step - 1, n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return groups[perm[pos]]
