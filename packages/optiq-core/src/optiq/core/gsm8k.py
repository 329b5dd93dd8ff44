"""GSM8K-style accuracy: generate an answer per question and compare final numbers.

Data: a local jsonl of ``{"question": ..., "answer": ...}`` records in GSM8K's format
(the gold number follows ``####`` at the end of ``answer``; a bare number also works).

Answer extraction from a generation, after removing ``<think>...</think>`` blocks (and
an unclosed ``<think>`` to the end), in order of preference:

1. the number after the last ``#### `` marker,
2. the content of the last ``\\boxed{...}``,
3. the last number in the text.

Numbers are compared numerically after removing thousands separators, currency signs
and trailing periods (``1,000``, ``$1000.00`` and ``1000`` are equal).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import DataError

BUNDLED_SAMPLE = Path(__file__).resolve().parent / "data" / "gsm8k_sample.jsonl"

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_THINK_OPEN = re.compile(r"<think>.*\Z", re.DOTALL)
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\s?\.\d+")
_FRAC = re.compile(r"\\d?frac\{\s*(-?\d+(?:\.\d+)?)\s*\}\{\s*(-?\d+(?:\.\d+)?)\s*\}")
_HASHES = re.compile(r"####\s*([^\n]*)")

PROMPT = (
    "Solve the following math problem step by step. "
    "End your reply with a final line of the form '#### <number>'.\n\n{question}"
)


def strip_thinking(text: str) -> str:
    """Remove reasoning blocks; an unclosed ``<think>`` hides everything after it."""
    text = _THINK_BLOCK.sub("", text)
    text = _THINK_OPEN.sub("", text)
    return text.replace("</think>", "")


def normalize_number(s: str) -> str | None:
    """Canonical decimal string of the first number in ``s`` (``None`` if there is none)."""
    m = _NUMBER.search(s.replace("\u2212", "-"))
    if not m:
        return None
    raw = m.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(round(value, 6)).rstrip("0").rstrip(".")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    j = i
    while j < len(text) and depth:
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
        j += 1
    return text[i : j - 1] if depth == 0 else text[i:]


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a generation (see module docstring), normalized."""
    body = strip_thinking(text)
    hashes = _HASHES.findall(body)
    for h in reversed(hashes):
        n = normalize_number(h)
        if n is not None:
            return n
    boxed = _last_boxed(body)
    if boxed is not None:
        frac = _FRAC.search(boxed)
        if frac:
            num, den = float(frac.group(1)), float(frac.group(2))
            if den:
                return normalize_number(repr(num / den))
        n = normalize_number(boxed)
        if n is not None:
            return n
    nums = _NUMBER.findall(body.replace("\u2212", "-"))
    return normalize_number(nums[-1]) if nums else None


@dataclass
class Problem:
    question: str
    answer: str
    gold: str


def load_problems(path: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """Read a GSM8K-style jsonl (``None``: the small bundled sample)."""
    p = Path(path).expanduser() if path is not None else BUNDLED_SAMPLE
    if not p.is_file():
        raise DataError(f"GSM8K file {p} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read GSM8K file {p}: {e}") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or "answer" not in rec:
            raise DataError(f"{p}:{i}: a record needs a string 'question' and an 'answer'")
        ans = str(rec["answer"])
        m = _HASHES.findall(ans)
        gold = normalize_number(m[-1]) if m else normalize_number(ans)
        if gold is None:
            raise DataError(f"{p}:{i}: no numeric answer found in 'answer'")
        out.append(Problem(rec["question"], ans, gold))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"GSM8K file {p} has no problems")
    return out


def is_correct(prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    try:
        return abs(float(prediction) - float(gold)) <= 1e-6 * max(1.0, abs(float(gold)))
    except ValueError:
        return prediction == gold


@dataclass
class GSM8KResult:
    accuracy: float
    correct: int
    total: int
    seconds: float
    details: list[dict[str, Any]] = field(default_factory=list)


def score(generations: Sequence[str], problems: Sequence[Problem]) -> GSM8KResult:
    """Score generations against problems (same order)."""
    details = []
    correct = 0
    for g, p in zip(generations, problems):
        pred = extract_answer(g)
        ok = is_correct(pred, p.gold)
        correct += ok
        details.append({"question": p.question, "gold": p.gold, "prediction": pred, "correct": ok, "output": g})
    n = len(details)
    return GSM8KResult(accuracy=correct / n if n else 0.0, correct=correct, total=n, seconds=0.0, details=details)


def build_prompt(tokenizer: Any, question: str, enable_thinking: bool = False) -> str:
    msg = PROMPT.format(question=question)
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": msg}],
                add_generation_prompt=True,
                tokenize=False,
                enable_thinking=enable_thinking,
            )
        except TypeError:
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=False
            )
    return msg + "\n"


def run_gsm8k(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    max_tokens: int = 256,
    enable_thinking: bool = False,
    generate_fn: Callable[[str], str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GSM8KResult:
    """Greedy-generate an answer per problem and score it.

    ``generate_fn(prompt) -> text`` replaces mlx-lm generation (tests, servers).
    """
    t0 = time.time()
    if generate_fn is None:
        from mlx_lm import generate

        def generate_fn(prompt: str) -> str:
            return generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens, verbose=False)

    outs = []
    for i, p in enumerate(problems):
        outs.append(generate_fn(build_prompt(tokenizer, p.question, enable_thinking)))
        if progress:
            progress(i + 1, len(problems))
    res = score(outs, problems)
    res.seconds = time.time() - t0
    return res
