"""Quality of a (quantized) model: perplexity and KL to a reference on local text.

``perplexity(model, tokenizer, texts)`` and ``mean_kl(model, ref_model, tokenizer, texts)``
cut the token stream into non-overlapping windows of ``seq_len`` tokens and score every
next-token prediction in them. Per-token statistics are computed in numpy fp32 (see
:mod:`optiq.core.kl`).

Both accept ``make_cache``: a callable ``model -> list of per-layer caches`` (e.g. a
mixed-precision KV cache). With it, each window is fed through the model in chunks of
``prefill_chunk`` tokens *through the cache*, so what the cache stores (quantized keys
and values, ...) affects the scores; without it the model runs each window in one
cache-free pass.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from .calibration import cut_windows
from .errors import DataError
from .kl import RefDist, kl_per_token, nll_per_token
from .model_io import bundled_model_path
from .quant.gdn import fast_gated_delta

MakeCache = Callable[[Any], list]
DEFAULT_SEQ_LEN = 256


def default_eval_text() -> Path:
    """The bundled model's held-out text (never used for training or calibration)."""
    return bundled_model_path() / "heldout.txt"


def load_texts(path: str | Path | None = None) -> list[str]:
    """Texts from a ``.txt`` file (one text) or a jsonl of ``text``/``messages`` records.

    ``None`` reads the bundled held-out text. Chat records are kept as message lists
    (rendered later with the tokenizer's chat template).
    """
    from .calibration import load_records, read_text_file

    p = Path(path).expanduser() if path is not None else default_eval_text()
    if p.suffix == ".jsonl":
        recs = load_records(p, "evaluation data")
        return [r["text"] if "text" in r else json.dumps(r["messages"]) for r in recs]
    raw = read_text_file(p, "evaluation data")
    if not raw.strip():
        raise DataError(f"evaluation data {p} is empty")
    return [raw]


def _render(text: str, tokenizer: Any) -> str:
    if text.startswith("[{") and text.rstrip().endswith("}]"):
        try:
            msgs = json.loads(text)
        except json.JSONDecodeError:
            return text
        from .calibration import render_record

        return render_record({"messages": msgs}, tokenizer)
    return text


def token_windows(
    tokenizer: Any,
    texts: Sequence[str],
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
) -> np.ndarray:
    """Non-overlapping windows [n, seq_len + 1] (inputs are ``[:, :-1]``, targets ``[:, 1:]``)."""
    if seq_len < 2:
        raise DataError("seq_len must be at least 2")
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for t in texts:
        ids.extend(tokenizer.encode(_render(t, tokenizer)))
        if eos is not None and len(texts) > 1:
            ids.append(int(eos))
    w = seq_len + 1
    n = max(1, len(ids) // w)
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    return cut_windows(ids[: n * w], n, w, "evaluation text")  # consecutive windows


def forward_logits(
    model: Any,
    x: mx.array,
    make_cache: MakeCache | None = None,
    prefill_chunk: int = 64,
) -> mx.array:
    """Logits for ``x`` [B, T]; through caches from ``make_cache`` in chunks when given."""
    if make_cache is None:
        return model(x)
    cache = make_cache(model)
    outs = []
    for s in range(0, x.shape[1], prefill_chunk):
        out = model(x[:, s : s + prefill_chunk], cache=cache)
        mx.eval(out)
        outs.append(out)
    return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood (nats/token)
    tokens: int
    seconds: float


@dataclass
class KLResult:
    mean_kl: float  # mean KL(reference || model), nats/token
    tokens: int
    ppl: float
    ref_ppl: float
    p95_kl: float
    max_kl: float
    seconds: float
    per_window: list[float] = field(default_factory=list)


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str] | np.ndarray,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 8,
    max_tokens: int | None = None,
    make_cache: MakeCache | None = None,
    prefill_chunk: int = 64,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``texts`` (or pre-cut windows [n, seq_len + 1])."""
    t0 = time.time()
    win = texts if isinstance(texts, np.ndarray) else token_windows(tokenizer, texts, seq_len, max_tokens)
    total, count = 0.0, 0
    with fast_gated_delta():
        for s in range(0, len(win), batch_size):
            b = win[s : s + batch_size]
            logits = forward_logits(model, mx.array(b[:, :-1]), make_cache, prefill_chunk)
            nll = nll_per_token(logits, b[:, 1:])
            total += float(nll.sum())
            count += nll.size
    mean = total / max(count, 1)
    return PerplexityResult(ppl=float(np.exp(mean)), nll=mean, tokens=count, seconds=time.time() - t0)


def mean_kl(
    model: Any,
    ref_model: Any,
    tokenizer: Any,
    texts: Sequence[str] | np.ndarray,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 8,
    max_tokens: int | None = None,
    make_cache: MakeCache | None = None,
    ref_make_cache: MakeCache | None = None,
    prefill_chunk: int = 64,
) -> KLResult:
    """Mean per-token ``KL(ref_model || model)`` on ``texts``, plus both perplexities.

    The two models must share the tokenizer (a quantized model and its source do).
    """
    t0 = time.time()
    win = texts if isinstance(texts, np.ndarray) else token_windows(tokenizer, texts, seq_len, max_tokens)
    kls, nll_m, nll_r, per_window = [], 0.0, 0.0, []
    with fast_gated_delta():
        for s in range(0, len(win), batch_size):
            b = win[s : s + batch_size]
            x = mx.array(b[:, :-1])
            tgt = b[:, 1:]
            ref_logits = forward_logits(ref_model, x, ref_make_cache, prefill_chunk)
            ref = RefDist.from_logits(ref_logits, tgt)
            logits = forward_logits(model, x, make_cache, prefill_chunk)
            kl = kl_per_token(ref, logits)
            kls.append(kl)
            per_window.extend(kl.reshape(len(b), -1).mean(axis=1).tolist())
            nll_m += float(nll_per_token(logits, tgt).sum())
            nll_r += float(-ref.logp_target.sum())
    allkl = np.concatenate(kls)
    n = allkl.size
    return KLResult(
        mean_kl=float(allkl.mean()),
        tokens=n,
        ppl=float(np.exp(nll_m / n)),
        ref_ppl=float(np.exp(nll_r / n)),
        p95_kl=float(np.percentile(allkl, 95)),
        max_kl=float(allkl.max()),
        seconds=time.time() - t0,
        per_window=per_window,
    )


@dataclass
class EvalReport:
    model: Path
    data: str
    seq_len: int
    perplexity: PerplexityResult | None = None
    kl: KLResult | None = None
    reference: Path | None = None
    reference_cache: str | None = None  # set when the reference is the model itself with stock caches
    gsm8k: Any = None
    loaded: Any = field(default=None, repr=False)  # the LoadedModel (reused for generation)


def evaluate_model(
    model_path: str | Path | None = None,
    *,
    reference: str | Path | None = None,
    data: str | Path | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
    batch_size: int = 8,
    make_cache: MakeCache | None = None,
) -> EvalReport:
    """What ``optiq eval`` computes: perplexity, and KL/perplexities against ``reference``.

    With ``make_cache`` (e.g. a mixed-precision KV cache) and no ``reference``, the
    reference is the same model with its stock full-precision caches, so the KL is the
    cache's own damage.
    """
    from .model_io import load_model, text_config

    texts = load_texts(data)
    lm = load_model(model_path)
    report = EvalReport(
        model=lm.path,
        data=str(Path(data).expanduser()) if data else str(default_eval_text()),
        seq_len=seq_len,
        loaded=lm,
    )
    win = token_windows(lm.tokenizer, texts, seq_len, max_tokens)
    if reference is None and make_cache is None:
        report.perplexity = perplexity(lm.model, lm.tokenizer, win, batch_size=batch_size)
        return report
    if reference is None:
        ref, report.reference_cache = lm, "full-precision KV"
    else:
        ref = load_model(reference)
        if text_config(ref.config).get("vocab_size") != text_config(lm.config).get("vocab_size"):
            raise DataError(f"{reference} and {lm.path} have different vocabularies: KL needs the same tokenizer")
    report.reference = ref.path
    report.kl = mean_kl(lm.model, ref.model, lm.tokenizer, win, batch_size=batch_size, make_cache=make_cache)
    report.perplexity = PerplexityResult(
        ppl=report.kl.ppl, nll=float(np.log(report.kl.ppl)), tokens=report.kl.tokens, seconds=report.kl.seconds
    )
    return report
