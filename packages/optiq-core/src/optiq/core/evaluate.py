"""Quality of a (quantized) model: perplexity and KL to a reference on local text.

``perplexity(model, tokenizer, texts)`` and ``mean_kl(model, ref_model, tokenizer, texts)``
cut the token stream into non-overlapping windows of ``seq_len`` tokens and score every
next-token prediction in them. The head's logits are made one vocabulary slice at a time
and folded into per-position statistics (:func:`.eval_stream.score_heads`), so no batch's
``tokens x vocabulary`` logits ever exist. :func:`evaluate_model` (``optiq eval``) goes
further: it streams both models from disk block by block (:mod:`.eval_stream`).

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
from .errors import ModelLoadError
from .eval_stream import logits_match, score_heads
from .model_io import bundled_model_path
from .quant.blocks import find_head, head_input_of
from .quant.gdn import fast_gated_delta
from .quant.targets import get_module

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


def forward_head_input(
    model: Any,
    x: mx.array,
    make_cache: MakeCache | None = None,
    prefill_chunk: int = 64,
) -> mx.array:
    """What ``model`` feeds its head for ``x`` [B, T] (never the vocabulary-sized logits);
    through caches from ``make_cache`` in chunks of ``prefill_chunk`` tokens when given."""
    head = find_head(model)
    if make_cache is None:
        return head_input_of(model, head, x)
    cache = make_cache(model)
    outs = []
    for s in range(0, x.shape[1], prefill_chunk):
        out = head_input_of(model, head, x[:, s : s + prefill_chunk], cache=cache)
        mx.eval(out)
        outs.append(out)
    return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def _check_logits(model: Any, x: mx.array) -> None:
    """Scoring goes through the head in slices (``xn @ W^T``): refuse models that transform
    their logits after it. Four tokens: under the CPU path's dequantize threshold."""
    x = x[:1, :4]
    head = find_head(model)
    if not logits_match(head_input_of(model, head, x), get_module(model, head.path), model(x)):
        raise ModelLoadError(
            f"{type(model).__name__} transforms its logits after the output head (scaling, soft-capping "
            "or a bias): optiq eval does not support it"
        )


def _scores(
    model: Any, x: mx.array, targets: np.ndarray, make_cache: MakeCache | None, prefill_chunk: int,
    ref_model: Any = None, ref_make_cache: MakeCache | None = None,
):
    head = get_module(model, find_head(model).path)
    xn = forward_head_input(model, x, make_cache, prefill_chunk)
    ref = None
    if ref_model is not None:
        ref = (get_module(ref_model, find_head(ref_model).path),
               forward_head_input(ref_model, x, ref_make_cache, prefill_chunk))
    return score_heads(head, xn, targets, ref)


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
    nll = []
    with fast_gated_delta():
        _check_logits(model, mx.array(win[:1, :-1]))
        for s in range(0, len(win), batch_size):
            b = win[s : s + batch_size]
            nll.append(_scores(model, mx.array(b[:, :-1]), b[:, 1:], make_cache, prefill_chunk).nll())
    return perplexity_result(np.concatenate(nll), time.time() - t0)


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
    nll, ref_nll, kl = [], [], []
    with fast_gated_delta():
        _check_logits(model, mx.array(win[:1, :-1]))
        _check_logits(ref_model, mx.array(win[:1, :-1]))
        for s in range(0, len(win), batch_size):
            b = win[s : s + batch_size]
            sc = _scores(model, mx.array(b[:, :-1]), b[:, 1:], make_cache, prefill_chunk, ref_model, ref_make_cache)
            nll.append(sc.nll())
            ref_nll.append(sc.ref_nll())
            kl.append(sc.kl())
    cat = np.concatenate
    return kl_result(cat(kl), cat(nll), cat(ref_nll), win.shape[1] - 1, time.time() - t0)


def perplexity_result(nll: np.ndarray, seconds: float) -> PerplexityResult:
    mean = float(nll.mean()) if nll.size else 0.0
    return PerplexityResult(ppl=float(np.exp(mean)), nll=mean, tokens=int(nll.size), seconds=seconds)


def kl_result(kl: np.ndarray, nll: np.ndarray, ref_nll: np.ndarray, seq_len: int, seconds: float) -> KLResult:
    """The summary of per-token KLs and NLLs (in window order, ``seq_len`` tokens a window)."""
    return KLResult(
        mean_kl=float(kl.mean()),
        tokens=int(kl.size),
        ppl=float(np.exp(nll.mean())),
        ref_ppl=float(np.exp(ref_nll.mean())),
        p95_kl=float(np.percentile(kl, 95)),
        max_kl=float(kl.max()),
        seconds=seconds,
        per_window=kl.reshape(-1, seq_len).mean(axis=1).tolist(),
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
    batch_size: int | None = None,
    make_cache: MakeCache | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalReport:
    """What ``optiq eval`` computes: perplexity, and KL/perplexities against ``reference``.

    Without ``make_cache`` both models are streamed (:mod:`.eval_stream`: one decoder
    block and one vocabulary slice at a time; ``batch_size`` windows per pass, default
    about 4,096 tokens), so memory stays near the models' stored size. With ``make_cache``
    (e.g. a mixed-precision KV cache) the models are loaded whole and run through their
    caches, logits still scored slice by slice; without a ``reference`` the reference is
    the same model with its stock full-precision caches, so the KL is the cache's own damage.
    ``log`` gets progress lines (``eval: window 16 of 30 (...)``).
    """
    from .model_io import load_model

    t0 = time.time()
    texts = load_texts(data)
    data_name = str(Path(data).expanduser()) if data else str(default_eval_text())
    if make_cache is None:
        from .eval_stream import open_blocks, streamed_scores

        bm, lm = open_blocks(model_path)
        report = EvalReport(model=lm.path, data=data_name, seq_len=seq_len)
        win = token_windows(lm.tokenizer, texts, seq_len, max_tokens)
        ref_bm = None
        if reference is not None:
            ref_bm, ref = open_blocks(reference)
            _same_vocab(ref, lm)
            report.reference = ref.path
        with fast_gated_delta():
            nll, ref_nll, kl = streamed_scores(bm, win, ref_bm, batch_size=batch_size, log=log)
        if kl is not None:
            report.kl = kl_result(kl, nll, ref_nll, seq_len, time.time() - t0)
        report.perplexity = perplexity_result(nll, time.time() - t0)
        return report

    lm = load_model(model_path)
    report = EvalReport(model=lm.path, data=data_name, seq_len=seq_len, loaded=lm)
    win = token_windows(lm.tokenizer, texts, seq_len, max_tokens)
    if reference is None:
        ref, report.reference_cache = lm, "full-precision KV"
    else:
        ref = load_model(reference)
        _same_vocab(ref, lm)
    report.reference = ref.path
    report.kl = mean_kl(lm.model, ref.model, lm.tokenizer, win, batch_size=batch_size or 8, make_cache=make_cache)
    report.perplexity = PerplexityResult(
        ppl=report.kl.ppl, nll=float(np.log(report.kl.ppl)), tokens=report.kl.tokens, seconds=report.kl.seconds
    )
    return report


def _same_vocab(ref: Any, lm: Any) -> None:
    from .model_io import text_config

    if text_config(ref.config).get("vocab_size") != text_config(lm.config).get("vocab_size"):
        raise DataError(f"{ref.path} and {lm.path} have different vocabularies: KL needs the same tokenizer")
