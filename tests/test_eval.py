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
