#!/usr/bin/env python3
"""Build and train OptiQ's bundled tiny Qwen3.5 model (``optiq-tiny``).

    uv run --group train-model python tools/train_bundled_model.py [--seed 0]

Deterministic given ``--seed``: it

1. reads Ambrose Bierce's *The Devil's Dictionary* (1911, public domain) from Debian's
   ``dict-devil`` package (``/usr/share/dictd/devil.dict.dz``; when it is not installed the
   .deb is fetched with ``apt-get download`` and unpacked with ``dpkg -x``), drops the
   dictd header entries and holds out every 12th entry (~8%) as ``heldout.txt``;
2. trains a byte-level BPE tokenizer (``tokenizers``) with Qwen3.5's pre-tokenizer regex,
   ByteLevel and NFC (what transformers re-applies for ``model_type: qwen3_5``), adds the
   chat/thinking special tokens, and writes a Qwen3-style chat template;
3. synthesizes chat samples from the training entries ("What is a WORD?" -> a short
   ``<think>`` block, then the definition; some rendered with ``enable_thinking=False``)
   and mixes them into training (~25% of tokens);
4. trains a tiny ``qwen3_5`` model (hybrid Gated DeltaNet + full attention; see
   ``optiq.core.tiny_models.TINY_TEXT_CONFIG``) with MLX on the CPU in fp32, AdamW with
   warmup + cosine decay. During training only, the Gated DeltaNet recurrence runs in an
   exactly equivalent chunked form (the WY/"chunked delta rule" used by real GDN
   trainers) instead of mlx-lm's per-token loop; the script checks it against the stock
   path before training;
5. saves the model as bfloat16 with mlx-lm's ``save_model``/``save_config``, reloads it
   with stock ``mlx_lm.load`` and checks tokenizer ids, the chat template and generation;
6. reports held-out perplexity of the trained model vs a random-init model of the same
   shape (same seed), greedy samples, and writes ``TRAINING.md`` and
   ``training_metrics.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optiq.core  # noqa: F401  (preloads OpenBLAS before mlx is imported)

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from optiq.core.model_io import bundled_model_path
from optiq.core.tiny_models import build_model, parameter_count, save_model_dir, tiny_config

REPO = Path(__file__).resolve().parents[1]
DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
DEVIL_DEB = "dict-devil"
HELDOUT_EVERY = 12  # every 12th entry (alphabetical order) is held out: ~8%

# Qwen3.5's pre-tokenizer (transformers' Qwen3_5Tokenizer re-applies it, with NFC and
# ByteLevel(add_prefix_space=False, use_regex=False), whatever tokenizer.json says).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"""
    r""" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # special: skipped when decoding
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]  # kept in text

# Qwen3-style template: thinking blocks are kept for assistant turns after the last user
# message; enable_thinking=false pre-fills an empty think block after the prompt.
CHAT_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

SAMPLE_TEXTS = [  # tokenizer round-trip checks: prose, chat, code, odd whitespace/unicode
    "POLITICS, n.  A strife of interests masquerading as a contest of principles.\n",
    "    When Adam long ago in Cupid's awful court\n        (For Cupid ruled ere Adam...)",
    "<|im_start|>user\nWhat is a lawyer?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    "The user wants a definition.\n</think>\n\nLAWYER, n. One skilled in circumvention.<|im_end|>\n",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\tif x >= 10: pass\n",
    "Caf\u0065\u0301 na\u00efve \u2014 r\u00e9sum\u00e9, 12345 + 6.78e-9; I'll we've THEY'RE\r\n\n\n  end",
]

CHAT_QUESTIONS = [
    "What is {a} {w}?",
    "Define {w}.",
    "What does \"{w}\" mean?",
    "What is the meaning of the word {w}?",
    "Give me the Devil's Dictionary definition of {w}.",
    "{W}?",
    "How would you define {w}?",
]
CHAT_THOUGHTS = [
    "The user wants the definition of {w}.",
    "The user asks what \"{w}\" means. I will give the dictionary entry for {w}.",
    "A definition of {w} is requested. I should answer with the entry.",
    "They want to know the meaning of {w}.",
]
SYSTEM_PROMPTS = [
    "You are a cynical lexicographer.",
    "You are a helpful assistant.",
    "Answer with a single dictionary entry.",
]
PROSE_PROMPT = "POLITICIAN, n."
CHAT_PROMPT = "What is a lawyer?"


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- data


def locate_devil_dict(workdir: Path) -> tuple[Path, Path, str]:
    """(devil.dict.dz, devil.index, where it came from); downloads the .deb if needed."""
    if DEVIL_DICT.exists() and (DEVIL_DICT.parent / "devil.index").exists():
        return DEVIL_DICT, DEVIL_DICT.parent / "devil.index", "installed dict-devil package"
    log(f"{DEVIL_DICT} not installed: fetching the Debian package with apt-get download")
    subprocess.run(["apt-get", "download", DEVIL_DEB], cwd=workdir, check=True)
    debs = sorted(workdir.glob(f"{DEVIL_DEB}_*.deb"))
    if not debs:
        raise SystemExit(f"apt-get download {DEVIL_DEB} produced no .deb")
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(workdir / "x")], check=True)
    dz = workdir / "x" / DEVIL_DICT.relative_to("/")
    return dz, dz.parent / "devil.index", f"{debs[-1].name} (apt-get download + dpkg -x)"


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_int(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def clean_entry(text: str) -> str:
    lines = [ln.rstrip() for ln in text.strip("\n").split("\n")]
    # right-aligned attributions ("<66 spaces>G.J.") -> 8 spaces of indent
    lines = [re.sub(r"^ {9,}", " " * 8, ln) for ln in lines]
    return "\n".join(lines).strip("\n")


def load_entries(dz: Path, index: Path) -> list[tuple[str, str]]:
    """(headword, entry text) in dictionary order, header entries (00-database-*) dropped."""
    raw = gzip.open(dz).read()
    spans: dict[int, tuple[str, int]] = {}
    for line in index.read_text(encoding="utf-8").splitlines():
        word, off, length = line.split("\t")
        if word.startswith("00database") or word.startswith("00-database"):
            continue
        o, n = _dictd_int(off), _dictd_int(length)
        spans.setdefault(o, (word, n))  # a few entries have two index words
    entries = []
    for o in sorted(spans):
        word, n = spans[o]
        text = clean_entry(raw[o : o + n].decode("utf-8"))
        if text.startswith("00-database"):
            continue
        entries.append((word, text))
    return entries


def split_entries(entries):
    train = [e for i, e in enumerate(entries) if i % HELDOUT_EVERY != HELDOUT_EVERY // 2]
    held = [e for i, e in enumerate(entries) if i % HELDOUT_EVERY == HELDOUT_EVERY // 2]
    return train, held


def first_paragraph(text: str, max_chars: int = 320) -> str:
    """The entry's first paragraph, unwrapped and cut at a sentence end near max_chars."""
    para = text.split("\n\n")[0]
    para = re.sub(r"\s+", " ", para).strip()
    if len(para) <= max_chars:
        return para
    cut = para[:max_chars]
    end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
    return cut[: end + 1] if end > 40 else cut.rsplit(" ", 1)[0] + " ..."


def chat_messages(word: str, text: str, rng: random.Random, entries):
    """One synthetic conversation about ``word`` (and, sometimes, a second word)."""
    w = word.strip()
    msgs = []
    if rng.random() < 0.2:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.15:  # a previous turn (its thinking is dropped by the template)
        w2, t2 = entries[rng.randrange(len(entries))]
        msgs.append({"role": "user", "content": _question(w2, rng)})
        msgs.append({"role": "assistant", "content": first_paragraph(t2, 120)})
    msgs.append({"role": "user", "content": _question(w, rng)})
    thinking = rng.random() < 0.7
    answer = first_paragraph(text, 200)
    if thinking:
        thought = rng.choice(CHAT_THOUGHTS).format(w=w)
        msgs.append({"role": "assistant", "content": answer, "reasoning_content": thought})
    else:
        msgs.append({"role": "assistant", "content": answer})
    return msgs, thinking


def _question(word: str, rng: random.Random) -> str:
    q = rng.choice(CHAT_QUESTIONS)
    a = "an" if word[:1].lower() in "aeiou" else "a"
    return q.format(w=word, W=word[:1].upper() + word[1:], a=a)


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers

    tok = Tokenizer(
        models.BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    n_added = len(SPECIAL_TOKENS) + len(MARKUP_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Like Qwen: control tokens are "special"; think/tool markers are added, not special.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def write_tokenizer_files(tok, out: Path, max_len: int) -> dict[str, int]:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + MARKUP_TOKENS}
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + MARKUP_TOKENS
    }
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": max_len,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    special_map = {
        "additional_special_tokens": [IM_START, IM_END],
        "eos_token": {"content": IM_END, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "pad_token": {"content": ENDOFTEXT, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    gen = {
        "bos_token_id": ids[ENDOFTEXT],
        "do_sample": True,
        "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
        "pad_token_id": ids[ENDOFTEXT],
        "temperature": 0.7,
        "top_p": 0.9,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return ids


def render_chat(messages, add_generation_prompt=False, enable_thinking=True) -> str:
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # like transformers
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(ValueError(m))
    return env.from_string(CHAT_TEMPLATE).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
    )


# ----------------------------------------------------------------------------- training-only fast path


def chunked_gated_delta(q, k, v, a, b, A_log, dt_bias, chunk: int = 16):
    """Gated delta rule over a whole sequence in chunks (training only; zero init state).

    Same math as mlx-lm's per-token ``gated_delta_ops`` (state S [Dv, Dk]):
    S_t = g_t S_{t-1} + k_t u_t^T-style rank-1 delta update, y_t = S_t q_t; within a chunk
    the updates are solved at once with the WY form, (I + A)^-1 computed by repeated
    squaring of the nilpotent strictly-lower-triangular part (log2(chunk) matmuls).
    """
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if Hv // Hk > 1:
        q = mx.repeat(q, Hv // Hk, -2)
        k = mx.repeat(k, Hv // Hk, -2)
    beta = mx.sigmoid(b.astype(mx.float32))
    log_g = -mx.exp(A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + dt_bias)
    pad = (-T) % chunk
    if pad:
        padt = lambda x: mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v, beta, log_g = map(padt, (q, k, v, beta, log_g))
    n = (T + pad) // chunk
    split = lambda x: x.reshape(B, n, chunk, Hv, -1).transpose(0, 3, 1, 2, 4)  # noqa: E731
    q, k, v = split(q), split(k), split(v)  # [B, H, n, C, D]
    beta = beta.reshape(B, n, chunk, Hv).transpose(0, 3, 1, 2)
    G = mx.cumsum(log_g.reshape(B, n, chunk, Hv).transpose(0, 3, 1, 2), axis=-1)
    tril = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    stril = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_), k=-1)
    diff = G[..., :, None] - G[..., None, :]
    decay = mx.where(tril, mx.exp(mx.where(tril, diff, 0.0)), 0.0)
    kb = k * beta[..., None]
    N = mx.where(stril, -(kb @ k.swapaxes(-1, -2)) * decay, 0.0)
    Tinv, P = mx.eye(chunk) + N, N  # (I - N)^-1 = (I + N)(I + N^2)(I + N^4)...
    for _ in range(int(math.log2(chunk)) - 1):
        P = P @ P
        Tinv = Tinv + Tinv @ P
    U0 = Tinv @ (v * beta[..., None])
    W = Tinv @ (kb * mx.exp(G)[..., None])
    QK = mx.where(tril, (q @ k.swapaxes(-1, -2)) * decay, 0.0)
    S = mx.zeros((B, Hv, Dk, Dv), dtype=mx.float32)
    ys = []
    for i in range(n):
        Gi = G[:, :, i]
        U = U0[:, :, i] - W[:, :, i] @ S
        ys.append((q[:, :, i] * mx.exp(Gi)[..., None]) @ S + QK[:, :, i] @ U)
        tail = mx.exp(Gi[..., -1:] - Gi)[..., None]
        S = S * mx.exp(Gi[..., -1])[..., None, None] + (k[:, :, i] * tail).swapaxes(-1, -2) @ U
    y = mx.stack(ys, axis=2).transpose(0, 2, 3, 1, 4).reshape(B, n * chunk, Hv, Dv)[:, :T]
    return y.astype(v.dtype), S.swapaxes(-1, -2)


def _chunked_training_update(orig):
    """qwen3_5's ``gated_delta_update`` with full-sequence calls routed to the chunked form."""

    def patched(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, use_kernel=True, **kw):
        if state is None and mask is None and not kw:
            return chunked_gated_delta(q, k, v, a, b, A_log, dt_bias)
        return orig(q, k, v, a, b, A_log, dt_bias, state, mask, use_kernel=use_kernel, **kw)

    return patched


def chunked_gdn_training():
    """Context manager: route qwen3_5's full-sequence GDN calls to the chunked form."""
    import mlx_lm.models.qwen3_5  # noqa: F401  (the module the seam patches)

    from optiq.core.mlx_lm_seam import gated_delta_replaced

    return gated_delta_replaced(_chunked_training_update)


# ----------------------------------------------------------------------------- eval


def nll_windows(model, ids: list[int], window: int, batch: int = 8) -> tuple[float, int]:
    """Sum of next-token NLL over non-overlapping windows of ``window`` tokens."""
    arr = np.array(ids, dtype=np.int32)
    n = (len(arr) - 1) // window
    total, count = 0.0, 0
    starts = [i * window for i in range(n)]
    for j in range(0, len(starts), batch):
        xs = np.stack([arr[s : s + window + 1] for s in starts[j : j + batch]])
        x = mx.array(xs)
        logits = model(x[:, :-1]).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, x[:, 1:], reduction="sum")
        total += loss.item()
        count += x[:, 1:].size
    return total, count


def perplexity(model, ids, window) -> float:
    total, count = nll_windows(model, ids, window)
    return math.exp(total / count)


def to_fp32(model) -> None:
    model.set_dtype(mx.float32)


def greedy(model, tokenizer, prompt: str, max_tokens: int) -> str:
    from mlx_lm import generate

    return generate(model, tokenizer, prompt, max_tokens=max_tokens, verbose=False)


# ----------------------------------------------------------------------------- main


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=bundled_model_path())
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--chat-fraction", type=float, default=0.25)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--eval-window", type=int, default=256)
    ap.add_argument("--devil-dict", type=Path, help="a devil.dict.dz (devil.index beside it)")
    args = ap.parse_args()
    t_start = time.time()
    seed = args.seed
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)
    mx.set_default_device(mx.cpu)

    out: Path = args.out
    tmp = Path(tempfile.mkdtemp(prefix="optiq-tiny-"))
    try:
        _run(args, out, tmp, t_start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args, out: Path, tmp: Path, t_start: float) -> None:
    seed = args.seed
    # ---- data
    if args.devil_dict:
        dz, index, source = args.devil_dict, args.devil_dict.parent / "devil.index", str(args.devil_dict)
    else:
        dz, index, source = locate_devil_dict(tmp)
    entries = load_entries(dz, index)
    train_entries, held_entries = split_entries(entries)
    heldout_text = "\n\n".join(t for _, t in held_entries) + "\n"
    log(
        f"data: {len(entries)} entries from {source}; train {len(train_entries)}, "
        f"held out {len(held_entries)} ({len(heldout_text)} chars)"
    )

    # ---- tokenizer (trained on the training entries only)
    cfg = tiny_config()
    vocab_size = cfg["vocab_size"]
    stage = tmp / "model"
    stage.mkdir()
    tok = train_tokenizer([t for _, t in train_entries], vocab_size)
    ids = write_tokenizer_files(tok, stage, cfg["max_position_embeddings"])
    eot = ids[ENDOFTEXT]
    cfg["eos_token_id"] = [ids[IM_END], eot]
    cfg["bos_token_id"] = eot
    cfg["pad_token_id"] = eot
    (stage / "heldout.txt").write_text(heldout_text)
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731

    # ---- documents: prose (runs of 4 consecutive entries) + synthetic chats
    prose_docs = [
        "\n\n".join(t for _, t in train_entries[i : i + 4]) + "\n"
        for i in range(0, len(train_entries), 4)
    ]
    prose_tok = [enc(d) for d in prose_docs]
    n_prose = sum(len(d) + 1 for d in prose_tok)
    rng = random.Random(seed)
    order = list(range(len(train_entries)))
    rng.shuffle(order)
    chat_docs, chat_tok, n_chat, n_think = [], [], 0, 0
    target = n_prose * args.chat_fraction / (1 - args.chat_fraction)
    i = 0
    while n_chat < target:
        w, t = train_entries[order[i % len(order)]]
        msgs, thinking = chat_messages(w, t, rng, train_entries)
        text = render_chat(msgs)
        chat_docs.append(text)
        chat_tok.append(enc(text))
        n_chat += len(chat_tok[-1]) + 1
        n_think += thinking
        i += 1
    heldout_ids = enc(heldout_text)
    log(
        f"tokens: prose {n_prose}, chat {n_chat} in {len(chat_docs)} chats "
        f"({n_think} with thinking), chat share {n_chat / (n_prose + n_chat):.1%}; "
        f"held-out {len(heldout_ids)} tokens ({len(heldout_text) / len(heldout_ids):.2f} chars/token)"
    )
    log("example chat sample:\n" + chat_docs[0])
    docs = prose_tok + chat_tok

    # ---- model
    model = build_model(cfg, seed=seed)
    n_params = parameter_count(model)
    log(f"model: qwen3_5, {n_params:,} parameters, layers {cfg['layer_types']}")

    # the chunked GDN must match mlx-lm's per-token recurrence on this model
    probe = mx.array(np.array(heldout_ids[:2 * 97], dtype=np.int32).reshape(2, 97))
    ref = model(probe)
    with chunked_gdn_training():
        fast = model(probe)
    err = mx.abs(ref - fast).max().item()
    log(f"chunked GDN vs mlx-lm per-token loop: max |logit diff| = {err:.2e}")
    if err > 1e-3:
        raise SystemExit("chunked Gated DeltaNet does not match mlx-lm's recurrence")

    T, B = args.seq_len, args.batch
    np_rng = np.random.RandomState(seed)

    def batches():
        epoch = 0
        while True:
            perm = np_rng.permutation(len(docs))
            stream = np.concatenate([np.array(docs[j] + [eot], dtype=np.int32) for j in perm])
            n_win = len(stream) // (T + 1)
            wins = stream[: n_win * (T + 1)].reshape(n_win, T + 1)
            wins = wins[np_rng.permutation(n_win)]
            for j in range(0, n_win - B + 1, B):
                yield epoch, wins[j : j + B]
            epoch += 1

    eval_ids = heldout_ids[: 16 * args.eval_window + 1]

    def quick_eval():
        with chunked_gdn_training():
            total, count = nll_windows(model, eval_ids, args.eval_window)
        return total / count

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    opt = optim.AdamW(learning_rate=args.lr, betas=[0.9, 0.95], weight_decay=args.weight_decay)

    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x), y).mean()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    loss0 = quick_eval()
    log(f"step 0: held-out loss {loss0:.3f} (ppl {math.exp(loss0):.1f})")
    history = [{"step": 0, "heldout_loss": loss0}]
    t_train = time.time()
    tokens_seen, ema = 0, None
    gen = batches()
    with chunked_gdn_training():
        for step in range(args.steps):
            epoch, xb = next(gen)
            x = mx.array(xb)
            opt.learning_rate = lr_at(step)
            loss, grads = loss_and_grad(model, x[:, :-1], x[:, 1:])
            grads, gnorm = optim.clip_grad_norm(grads, 1.0)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state, loss)
            tokens_seen += B * T
            ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
            if (step + 1) % 10 == 0 or step == 0:
                el = time.time() - t_train
                log(
                    f"step {step + 1}/{args.steps} epoch {epoch} loss {loss.item():.3f} "
                    f"(ema {ema:.3f}) lr {lr_at(step):.2e} gnorm {gnorm.item():.2f} "
                    f"{tokens_seen / el:.0f} tok/s, {el:.0f}s"
                )
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                hl = quick_eval()
                history.append({"step": step + 1, "heldout_loss": hl, "train_loss_ema": ema})
                log(f"  held-out loss {hl:.3f} (ppl {math.exp(hl):.1f})")
    train_time = time.time() - t_train
    load_avg = os.getloadavg()[2] if hasattr(os, "getloadavg") else None
    log(f"trained {args.steps} steps, {tokens_seen:,} tokens in {train_time:.0f}s")

    # ---- save (bf16) and reload with stock mlx_lm.load
    save_model_dir(model, cfg, stage)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(stage, out)
    from mlx_lm import load as mlx_load

    loaded, tokenizer = mlx_load(str(out))
    check_tokenizer(tok, tokenizer)
    to_fp32(loaded)
    random_model = build_model(cfg, seed=seed)

    W = args.eval_window
    ppl_trained = perplexity(loaded, heldout_ids, W)
    ppl_random = perplexity(random_model, heldout_ids, W)
    ppl_long = {w: perplexity(loaded, heldout_ids, w) for w in (1024,)}
    log(f"held-out ppl (window {W}): trained {ppl_trained:.2f}, random init {ppl_random:.2f}")
    for w, p in ppl_long.items():
        log(f"held-out ppl (window {w}): trained {p:.2f}")

    samples = {}
    samples["prose"] = (PROSE_PROMPT, greedy(loaded, tokenizer, PROSE_PROMPT, 60))
    for think in (True, False):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT_PROMPT}],
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=think,
        )
        samples[f"chat_thinking_{'on' if think else 'off'}"] = (
            prompt,
            greedy(loaded, tokenizer, prompt, 80),
        )
    for name, (p, s) in samples.items():
        log(f"--- sample {name}\n{p}\u2502{s}")
    total_time = time.time() - t_start

    weights = out / "model.safetensors"
    metrics = {
        "seed": seed,
        "model_type": cfg["model_type"],
        "parameters": n_params,
        "config": {k: cfg[k] for k in cfg if k not in ("layer_types",)},
        "layer_types": cfg["layer_types"],
        "data": {
            "source": "Ambrose Bierce, The Devil's Dictionary (1911, public domain), Debian dict-devil",
            "entries_total": len(entries),
            "entries_train": len(train_entries),
            "entries_heldout": len(held_entries),
            "heldout_rule": f"entry i (dictionary order) with i % {HELDOUT_EVERY} == {HELDOUT_EVERY // 2}",
            "heldout_chars": len(heldout_text),
            "heldout_tokens": len(heldout_ids),
            "train_prose_tokens": n_prose,
            "train_chat_tokens": n_chat,
            "chat_samples": len(chat_docs),
            "chat_samples_with_thinking": n_think,
        },
        "training": {
            "steps": args.steps,
            "batch": B,
            "seq_len": T,
            "tokens_seen": tokens_seen,
            "epochs": tokens_seen / (n_prose + n_chat),
            "optimizer": "AdamW(betas=(0.9,0.95), wd=%g), grad clip 1.0" % args.weight_decay,
            "lr_peak": args.lr,
            "warmup_steps": args.warmup,
            "schedule": "linear warmup, cosine to 10% of peak",
            "precision": "fp32 (saved as bfloat16, A_log fp32)",
            "train_seconds": round(train_time, 1),
            "total_seconds": round(total_time, 1),
            "tokens_per_second": round(tokens_seen / train_time, 1),
            "device": "CPU, %d cores" % os.cpu_count(),
            "load_average_15min_at_end": None if load_avg is None else round(load_avg, 2),
            "history": history,
        },
        "eval": {
            "heldout_window": W,
            "heldout_ppl_trained": round(ppl_trained, 3),
            "heldout_ppl_random_init": round(ppl_random, 3),
            "heldout_ppl_trained_by_window": {str(w): round(p, 3) for w, p in ppl_long.items()},
        },
        "samples": {k: {"prompt": p, "completion": s} for k, (p, s) in samples.items()},
        "model_safetensors_sha256": sha256_file(weights),
        "tokenizer_json_sha256": sha256_file(out / "tokenizer.json"),
    }
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "TRAINING.md").write_text(training_md(metrics, args))
    size = sum(p.stat().st_size for p in out.iterdir())
    log(f"wrote {out} ({size / 1e6:.2f} MB) in {total_time:.0f}s total")


def check_tokenizer(tok, wrapper) -> None:
    """Stock mlx_lm.load's tokenizer must give the same ids as the raw tokenizer."""
    for text in SAMPLE_TEXTS:
        a = tok.encode(text, add_special_tokens=False).ids
        b = wrapper.encode(text, add_special_tokens=False)
        if a != b:
            raise SystemExit(f"tokenizer mismatch on {text!r}:\n{a}\n{b}")
        if wrapper.decode(b) != tok.decode(a, skip_special_tokens=False):
            raise SystemExit(f"decode mismatch on {text!r}")
    msgs = [{"role": "user", "content": CHAT_PROMPT}]
    on = wrapper.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    off = wrapper.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert on == f"{IM_START}user\n{CHAT_PROMPT}{IM_END}\n{IM_START}assistant\n", on
    assert off == on + "<think>\n\n</think>\n\n", off
    conv = msgs + [{"role": "assistant", "content": "An x.", "reasoning_content": "Easy."}]
    full = wrapper.apply_chat_template(conv, tokenize=False)
    assert full == render_chat(conv), (full, render_chat(conv))
    assert full.endswith(f"{IM_START}assistant\n<think>\nEasy.\n</think>\n\nAn x.{IM_END}\n"), full
    log("tokenizer: mlx_lm.load ids == tokenizers ids on sample texts; chat template OK")


def busy_note(t: dict) -> str:
    load = t.get("load_average_15min_at_end")
    cores = int(t["device"].split(", ")[1].split()[0])
    if load is None or load <= cores:
        return ""
    return f" (shared with other jobs: 15-min load average {load:.1f}, so slower than an idle machine)"


def training_md(m: dict, args) -> str:
    c, d, t, e = m["config"], m["data"], m["training"], m["eval"]
    s = m["samples"]
    return f"""# optiq-tiny: how it was trained

Built by `tools/train_bundled_model.py` (seed {m['seed']}):

    uv run --group train-model python tools/train_bundled_model.py --seed {m['seed']}

**Data.** Ambrose Bierce, *The Devil's Dictionary* (1911; public domain), from Debian's
`dict-devil` package (dictd header entries removed): {d['entries_total']} entries, of which
{d['entries_heldout']} (every {HELDOUT_EVERY}th, ~8%) are held out in `heldout.txt`
({d['heldout_chars']:,} chars, {d['heldout_tokens']:,} tokens). Training mixes prose
({d['train_prose_tokens']:,} tokens, runs of 4 entries) with {d['chat_samples']:,} synthetic
chats built from the training entries ({d['train_chat_tokens']:,} tokens, ~{args.chat_fraction:.0%}; "What is a WORD?" ->
`<think>` + definition, {d['chat_samples_with_thinking']} with thinking, the rest with an empty think block).

**Tokenizer.** Byte-level BPE trained with `tokenizers` on the training entries:
{c['vocab_size']} tokens including `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (special) and
`<think>`, `</think>`, `<tool_call>`, `</tool_call>`; Qwen3.5 pre-tokenizer regex + ByteLevel + NFC,
so `mlx_lm.load` (transformers' Qwen3.5 tokenizer class) gives the same ids. Qwen3-style
chat template with `enable_thinking`.

**Shape.** `qwen3_5`, {c['num_hidden_layers']} layers (Gated DeltaNet, full attention every
{c['full_attention_interval']}th: layers {[i for i, x in enumerate(m['layer_types']) if x == 'full_attention']}),
hidden {c['hidden_size']}, MLP {c['intermediate_size']}, attention {c['num_attention_heads']} heads /
{c['num_key_value_heads']} KV head x {c['head_dim']}, GDN {c['linear_num_key_heads']} key heads x
{c['linear_key_head_dim']} / {c['linear_num_value_heads']} value heads x {c['linear_value_head_dim']},
vocab {c['vocab_size']}, untied lm_head, max positions {c['max_position_embeddings']}:
**{m['parameters']:,} parameters**, stored as bfloat16 (A_log fp32).

**Training.** MLX on the CPU, fp32, {t['steps']} steps x {t['batch']} x {t['seq_len']} tokens
= {t['tokens_seen']:,} tokens ({t['epochs']:.1f} passes over the training mix), {t['optimizer']},
peak LR {t['lr_peak']:g}, {t['schedule']} ({t['warmup_steps']} warmup steps). Wall time
{t['train_seconds']:.0f} s of training ({t['tokens_per_second']:.0f} tok/s), {t['total_seconds']:.0f} s
for the whole script, on {t['device']}{busy_note(t)}. Gated DeltaNet ran in an exactly equivalent
chunked form during training (checked against mlx-lm's per-token recurrence).

**Held-out perplexity** (`heldout.txt`, windows of {e['heldout_window']} tokens):
trained **{e['heldout_ppl_trained']:.2f}** vs random init **{e['heldout_ppl_random_init']:.2f}**
(window 1024: {e['heldout_ppl_trained_by_window'].get('1024', float('nan')):.2f}).

**Greedy samples.**

Prose, prompt `{s['prose']['prompt']}`:

```
{s['prose']['prompt']}{s['prose']['completion']}
```

Chat, thinking on:

```
{s['chat_thinking_on']['prompt']}{s['chat_thinking_on']['completion']}
```

Chat, thinking off:

```
{s['chat_thinking_off']['prompt']}{s['chat_thinking_off']['completion']}
```

It is a toy: it knows the style of one 1911 book, nothing else.
"""


if __name__ == "__main__":
    sys.exit(main())
