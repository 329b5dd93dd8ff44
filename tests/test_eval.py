"""optiq eval: perplexity, KL to a reference, cache factories, GSM8K-style scoring."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from optiq.cli.main import main
from optiq.core.errors import DataError
from optiq.core.evaluate import load_texts, mean_kl, perplexity, token_windows
from optiq.core.gsm8k import (
    BUNDLED_SAMPLE,
    extract_answer,
    is_correct,
    load_problems,
    run_gsm8k,
    strip_thinking,
)


@pytest.fixture(scope="module")
def lm(bundled_model_dir):
    from optiq.core.model_io import load_model

    return load_model(bundled_model_dir)


@pytest.fixture(scope="module")
def windows(lm):
    return token_windows(lm.tokenizer, load_texts(None), 128, max_tokens=768)


def test_perplexity_of_the_trained_model_on_held_out_text(lm, windows):
    r = perplexity(lm.model, lm.tokenizer, windows)
    assert r.tokens == windows.shape[0] * 128
    assert 20 < r.ppl < 600  # trained: ~185 on heldout.txt; random init: ~2400
    assert r.nll == pytest.approx(np.log(r.ppl))


def test_kl_to_itself_is_zero_and_grows_with_noise(lm, windows):
    same = mean_kl(lm.model, lm.model, lm.tokenizer, windows)
    assert same.mean_kl == 0.0 and same.ppl == pytest.approx(same.ref_ppl)
    from optiq.core.model_io import load_model
    from optiq.core.quant.targets import get_module

    noisy = load_model(lm.path)
    head = get_module(noisy.model, "language_model.lm_head")
    w = head["weight"]
    head["weight"] = w + 0.02 * mx.random.normal(w.shape, key=mx.random.key(0))
    r = mean_kl(noisy.model, lm.model, lm.tokenizer, windows)
    assert r.mean_kl > 1e-4 and r.p95_kl >= r.mean_kl * 0.5 and r.max_kl >= r.p95_kl
    assert len(r.per_window) == windows.shape[0]


def test_cache_factory_path_matches_the_plain_forward(lm, windows):
    from mlx_lm.models.cache import make_prompt_cache

    plain = perplexity(lm.model, lm.tokenizer, windows[:2])
    cached = perplexity(lm.model, lm.tokenizer, windows[:2], make_cache=make_prompt_cache, prefill_chunk=32)
    assert cached.ppl == pytest.approx(plain.ppl, rel=1e-3)
    calls = []

    def factory(model):
        calls.append(1)
        return make_prompt_cache(model)

    mean_kl(lm.model, lm.model, lm.tokenizer, windows[:2], make_cache=factory, batch_size=1)
    assert len(calls) == 2  # one fresh cache per batch


def test_eval_data_files(tmp_path, lm):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"text": "A short note about rivers and lakes. " * 20}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "What is a lawyer?"},
                                   {"role": "assistant", "content": "One skilled in circumvention."}]}) + "\n"
    )
    texts = load_texts(tmp_path / "d.jsonl")
    win = token_windows(lm.tokenizer, texts, 32)
    assert win.shape[1] == 33 and win.shape[0] >= 3
    with pytest.raises(DataError, match="fewer than one window"):
        token_windows(lm.tokenizer, ["hi"], 64)


@pytest.mark.parametrize(
    "text, want",
    [
        ("so the total is 5 + 7 = 12.\n#### 12", "12"),
        ("#### 1,234", "1234"),
        ("<think>maybe 3? or 9</think>The answer is $1,000.00.", "1000"),
        ("<think>I think it is 41, let me", None),  # unclosed thinking: no answer yet
        ("Thus \\boxed{42}. Check: 6*7 = 42 and 40 + 2 = 43", "42"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("We get 18 apples, then 4 more, so 22", "22"),
        ("answer: -3.50 degrees", "-3.5"),
        ("#### 7\nwait, actually\n#### 9", "9"),
        ("no digits here", None),
    ],
)
def test_answer_extraction(text, want):
    assert extract_answer(text) == want


def test_think_stripping_and_numeric_comparison():
    assert strip_thinking("a<think>b</think>c<think>d") == "ac"
    assert is_correct("3600", "3600") and is_correct("35.50", "35.5") and not is_correct(None, "1")
    assert not is_correct("17", "71")


def test_bundled_gsm8k_sample_and_scorer():
    probs = load_problems()
    assert len(probs) >= 15 and all(p.gold is not None for p in probs)
    assert load_problems(BUNDLED_SAMPLE, limit=3)[2].gold == probs[2].gold

    # a fake model: right on even problems, wrong on odd ones, always "thinking" first
    answers = {p.question: p.gold for p in probs}
    seen = []

    def fake(prompt: str) -> str:
        q = next(q for q in answers if q in prompt)
        i = list(answers).index(q)
        seen.append(i)
        gold = answers[q]
        final = gold if i % 2 == 0 else str(int(float(gold)) + 1)
        return f"<think>the answer might be {final}0</think>Step by step...\n#### {final}"

    class Tok:
        chat_template = None

    res = run_gsm8k(None, Tok(), probs, generate_fn=fake)
    assert res.total == len(probs) and res.correct == (len(probs) + 1) // 2
    assert res.accuracy == pytest.approx(res.correct / res.total)
    assert seen == list(range(len(probs)))


def test_gsm8k_file_errors(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(DataError, match="'question' and an 'answer'"):
        load_problems(p)
    p.write_text(json.dumps({"question": "q?", "answer": "none"}) + "\n")
    with pytest.raises(DataError, match="no numeric answer"):
        load_problems(p)
    with pytest.raises(DataError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")


@pytest.mark.slow
def test_cli_eval(capsys, bundled_model_dir):
    main(["eval", "--max-tokens", "512", "--seq-len", "128", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 512 and 20 < out["perplexity"] < 600
    main(["eval", str(bundled_model_dir), "--reference", str(bundled_model_dir), "--max-tokens", "256",
          "--seq-len", "128", "--gsm8k", "bundled", "--gsm8k-limit", "2", "--gen-tokens", "8"])
    text = capsys.readouterr().out
    assert "mean KL:     0.000000" in text and "gsm8k:       " in text and "/2 correct" in text


def test_cli_eval_errors(capsys, tmp_path):
    for argv, match in (
        (["eval", "--data", str(tmp_path / "none.txt")], "does not exist"),
        (["eval", "--gsm8k", str(tmp_path / "none.jsonl")], "does not exist"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and match in err


# ------------------------------------------------------------------ streamed eval == whole-model eval
def _direct(cand_dir, ref_dir, windows):
    """Today's whole-model computation: full logits of each model, numpy statistics."""
    from optiq.core.kl import RefDist, kl_per_token, nll_per_token
    from optiq.core.model_io import load_model
    from optiq.core.quant.gdn import fast_gated_delta

    cand, ref = load_model(cand_dir).model, load_model(ref_dir).model
    x, tgt = mx.array(windows[:, :-1]), windows[:, 1:]
    with fast_gated_delta():
        r = RefDist.from_logits(ref(x), tgt)
        z = cand(x)
    return kl_per_token(r, z), nll_per_token(z, tgt), -r.logp_target


def _tied_quant(root):
    """A tied-embedding tiny model and its ``mlx_lm.convert -q`` quant (quantized embedding as head)."""
    from mlx_lm import convert

    from optiq.core.model_io import bundled_model_path
    from optiq.core.tiny_models import build_model, copy_tokenizer_files, save_model_dir, tiny_config

    cfg = tiny_config(tie_word_embeddings=True)
    src = save_model_dir(build_model(cfg, seed=3), cfg, root / "tied")
    copy_tokenizer_files(bundled_model_path(), src)
    convert(str(src), mlx_path=str(root / "tied-q4"), quantize=True, q_bits=4, q_group_size=64)
    return root / "tied-q4", src


@pytest.mark.parametrize("pair", ["bundled-quant", "tied-q4"])
def test_streamed_eval_equals_the_whole_model_computation(pair, tmp_path, windows, bundled_model_dir):
    from optiq.core import eval_stream
    from optiq.core.evaluate import evaluate_model
    from optiq.core.model_io import bundled_quant_path, has_bundled_quant

    if pair == "bundled-quant":
        if not has_bundled_quant():
            pytest.skip("bundled quant not built")
        cand, ref = bundled_quant_path(), bundled_model_dir
    else:
        cand, ref = _tied_quant(tmp_path)
    kl, nll, ref_nll = _direct(cand, ref, windows)
    lines = []
    # several vocabulary slices and batches, so the online statistics really stream
    old = eval_stream.TILE_ELEMENTS
    eval_stream.TILE_ELEMENTS = 256 * 128
    try:
        rep = evaluate_model(cand, reference=ref, seq_len=128, max_tokens=768, batch_size=4, log=lines.append)
    finally:
        eval_stream.TILE_ELEMENTS = old
    assert rep.kl.tokens == kl.size == windows.size - len(windows)
    assert rep.kl.mean_kl == pytest.approx(kl.mean(), rel=1e-4, abs=1e-7)
    assert rep.kl.mean_kl > 1e-4  # a real quantization error, not a vacuous zero
    assert rep.kl.max_kl == pytest.approx(kl.max(), rel=1e-3)
    assert rep.kl.ppl == pytest.approx(np.exp(nll.mean()), rel=1e-5)
    assert rep.kl.ref_ppl == pytest.approx(np.exp(ref_nll.mean()), rel=1e-5)
    assert rep.perplexity.ppl == rep.kl.ppl
    assert np.allclose(rep.kl.per_window, kl.reshape(len(windows), -1).mean(1), rtol=1e-3, atol=1e-6)
    assert "eval: window 0 of 6 (model block 1 of 8)" in lines[0] and "(reference block 8 of 8)" in lines[15]
    assert lines[16].startswith("eval: window 4 of 6 (head)") and lines[-1].startswith("eval: window 6 of 6 (head)")
    # the in-memory path (what --kv-config uses) scores the same way
    from optiq.core.model_io import load_model

    mem = mean_kl(load_model(cand).model, load_model(ref).model, None, windows, batch_size=4)
    assert mem.mean_kl == pytest.approx(kl.mean(), rel=1e-4, abs=1e-7)
    assert mem.ppl == pytest.approx(rep.kl.ppl, rel=1e-5)


def test_streamed_perplexity_and_self_kl(lm, windows):
    from optiq.core.evaluate import evaluate_model

    alone = evaluate_model(lm.path, seq_len=128, max_tokens=768)
    assert alone.kl is None and alone.perplexity.tokens == windows.size - len(windows)
    assert alone.perplexity.ppl == pytest.approx(perplexity(lm.model, lm.tokenizer, windows).ppl, rel=1e-5)
    same = evaluate_model(lm.path, reference=lm.path, seq_len=128, max_tokens=768)
    assert same.kl.mean_kl == 0.0 and same.kl.ppl == same.kl.ref_ppl


def test_sliced_scores_match_the_whole_vocabulary_statistics():
    from optiq.core.kl import RefDist, SlicedScores, kl_per_token, nll_per_token

    rng = np.random.default_rng(0)
    r = (3 * rng.standard_normal((50, 1000))).astype(np.float32)
    z = r + (0.3 * rng.standard_normal(r.shape)).astype(np.float32)
    z[7, 900:] += 40.0  # a late slice raises the running max: earlier sums get rescaled
    tgt = rng.integers(0, 1000, 50)
    sc = SlicedScores(tgt, with_ref=True)
    for s0 in range(0, 1000, 96):
        sc.add(s0, z[:, s0 : s0 + 96], r[:, s0 : s0 + 96])
    ref = RefDist.from_logits(r, tgt)
    assert np.allclose(sc.kl(), kl_per_token(ref, z), rtol=1e-4, atol=1e-5)
    assert np.allclose(sc.nll(), nll_per_token(z, tgt), rtol=1e-6, atol=1e-5)
    assert np.allclose(sc.ref_nll(), -ref.logp_target, rtol=1e-6, atol=1e-5)
