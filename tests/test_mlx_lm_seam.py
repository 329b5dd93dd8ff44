"""optiq.core.mlx_lm_seam: its checks pass on the installed mlx-lm, every patch puts the
original back (on exit, on an exception, after nesting and across threads), and a
simulated mlx-lm change fails the matching check with a message naming the version."""

from __future__ import annotations

import threading
import types

import mlx.core as mx
import mlx_lm.models.qwen3_5 as qwen3_5
import mlx_lm.utils
import pytest
from mlx_lm.models import base, cache, gated_delta
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from optiq.core import mlx_lm_seam as seam
from optiq.core.errors import MlxLmIncompatible, ModelLoadError, PatchConflict
from optiq.core.kv.attention import mixed_attention, mixed_scaled_dot_product_attention
from optiq.core.model_io import check_model_type
from optiq.core.quant.gdn import fast_gated_delta
from optiq.train.trainer import grad_checkpointing

VERSION = f"mlx-lm {seam.mlx_lm_version()}"


def fake_model_module(name: str = "fake_model") -> types.ModuleType:
    """A stand-in for an mlx-lm model module: imported the stock SDPA by name."""
    mod = types.ModuleType(name)
    mod.scaled_dot_product_attention = base.scaled_dot_product_attention
    return mod


def other_sdpa(queries, keys, values, cache, scale, mask, sinks=None):
    return base.scaled_dot_product_attention(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def tiny_llama():
    cfg = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5, vocab_size=64)
    model_cls, args_cls = seam.model_classes(cfg)
    return model_cls(args_cls.from_dict(cfg))


# ------------------------------------------------------------------ (1) checks pass


def test_every_check_passes_against_installed_mlx_lm():
    assert seam.run_checks() == {name: None for name in seam.CHECKS}
    assert seam.check_all() == list(seam.CHECKS)


def test_private_accessors_return_mlx_lm_objects():
    assert seam.base_cache_class() is cache._BaseCache
    assert seam.stock_sdpa() is base.scaled_dot_product_attention
    assert seam.switch_linear_class() is QuantizedSwitchLinear
    model_cls, args_cls = seam.model_classes({"model_type": "llama"})
    assert model_cls.__module__ == "mlx_lm.models.llama" and args_cls.__name__ == "ModelArgs"
    with pytest.raises(ValueError):  # unknown model types stay mlx-lm's ValueError
        seam.model_classes({"model_type": "no-such-model"})
    assert cache.MixedKVCache.__module__ == "optiq.core.kv.cache"  # held since import


# ------------------------------------------------------------------ (2) restored on exit


def test_fast_gated_delta_nests_and_restores_on_exit_and_exception():
    original = qwen3_5.gated_delta_update
    with fast_gated_delta() as n:
        assert n >= 1 and qwen3_5.gated_delta_update is not original
        patched = qwen3_5.gated_delta_update
        with fast_gated_delta():
            assert qwen3_5.gated_delta_update is patched  # nested: one shared replacement
        assert qwen3_5.gated_delta_update is patched  # the inner exit keeps the outer's patch
    assert qwen3_5.gated_delta_update is original
    with pytest.raises(RuntimeError, match="boom"), fast_gated_delta():
        raise RuntimeError("boom")
    assert qwen3_5.gated_delta_update is original


def test_sdpa_block_and_lifetime_hold_restore_the_stock_function():
    mod = fake_model_module()
    stock = base.scaled_dot_product_attention
    with pytest.raises(RuntimeError), seam.sdpa_replaced([mod], other_sdpa):
        assert mod.scaled_dot_product_attention is other_sdpa
        raise RuntimeError
    assert mod.scaled_dot_product_attention is stock
    assert seam.hold_sdpa([mod], other_sdpa) == 1
    assert seam.hold_sdpa([mod], other_sdpa) == 1  # idempotent
    with seam.sdpa_replaced([mod], other_sdpa):
        seam.release_sdpa([mod])
        assert mod.scaled_dot_product_attention is other_sdpa  # the block still holds it
    assert mod.scaled_dot_product_attention is stock and not seam.replaced(mod, "scaled_dot_product_attention")


def test_mixed_attention_block_restores_the_model_modules():
    import mlx_lm.models.llama as llama

    model = tiny_llama()
    before = llama.scaled_dot_product_attention  # a kv test may hold it installed already
    with mixed_attention(model) as n:
        assert n == 1 and llama.scaled_dot_product_attention is mixed_scaled_dot_product_attention
    assert llama.scaled_dot_product_attention is before


def test_grad_checkpointing_wraps_and_restores_the_block_class():
    model = tiny_llama()
    cls = type(model.layers[0])
    original = vars(cls)["__call__"]
    x = mx.ones((1, 3, 32))
    ref = model.layers[0](x, None, None)
    with pytest.raises(KeyError), grad_checkpointing(model.layers) as n:
        assert n == 1 and vars(cls)["__call__"] is not original
        with grad_checkpointing(model.layers):  # nests without wrapping twice
            out = model.layers[0](x, None, None)
        raise KeyError
    assert vars(cls)["__call__"] is original
    assert mx.allclose(out, ref).item()


def test_cache_class_registration_held_and_released():
    class OptiqTestCache:
        pass

    assert seam.hold_cache_classes([OptiqTestCache]) == 1
    assert seam.hold_cache_classes([OptiqTestCache]) == 1
    assert cache.OptiqTestCache is OptiqTestCache
    seam.release_cache_classes([OptiqTestCache])
    assert not hasattr(cache, "OptiqTestCache")


def test_holders_on_two_threads_share_one_patch():
    """The first thread leaving does not take the patch from the other (the server's
    generation thread and a caller may overlap)."""
    mod = fake_model_module()
    entered, first_left, seen = threading.Event(), threading.Event(), []

    def second():
        with seam.sdpa_replaced([mod], other_sdpa):
            entered.set()
            first_left.wait()
            seen.append(mod.scaled_dot_product_attention)

    with seam.sdpa_replaced([mod], other_sdpa):
        t = threading.Thread(target=second)
        t.start()
        entered.wait()
    first_left.set()
    t.join()
    assert seen == [other_sdpa]
    assert mod.scaled_dot_product_attention is base.scaled_dot_product_attention


def test_a_different_replacement_while_held_is_a_conflict():
    mod = fake_model_module()
    with seam.sdpa_replaced([mod], other_sdpa):
        with pytest.raises(PatchConflict, match="already replaced"):
            with seam.sdpa_replaced([mod], mixed_scaled_dot_product_attention):
                pass
        assert mod.scaled_dot_product_attention is other_sdpa
    assert mod.scaled_dot_product_attention is base.scaled_dot_product_attention


def test_prime_bpe_detokenizer_leaves_other_detokenizers_alone():
    other = types.SimpleNamespace(text="", offset=0)
    assert seam.prime_bpe_detokenizer(other, "\x00") is False and other.text == ""


# ------------------------------------------------------------------ (3) simulated mlx-lm changes


def failed(check) -> str:
    with pytest.raises(MlxLmIncompatible) as e:
        check()
    assert VERSION in str(e.value) and seam.TESTED_WITH in str(e.value)
    return str(e.value)


def test_changed_gated_delta_signature_fails_check_all(monkeypatch):
    monkeypatch.setattr(gated_delta, "gated_delta_update", lambda q, k, v, g, beta: None)
    msg = failed(seam.check_all)
    assert "mlx_lm.models.gated_delta.gated_delta_update changed its signature" in msg
    assert "(q, k, v, g, beta)" in msg
    assert [n for n, p in seam.run_checks().items() if p] == ["gated_delta_update"]


def test_changed_gated_delta_in_a_model_module_fails_at_patch_time_and_patches_nothing(monkeypatch):
    def renamed(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, *, use_kernel=True):
        raise AssertionError("never called")

    monkeypatch.setattr(qwen3_5, "gated_delta_update", renamed)
    import mlx_lm.models.qwen3_next as qwen3_next

    other = qwen3_next.gated_delta_update
    msg = failed(lambda: fast_gated_delta().__enter__())
    assert "qwen3_5.gated_delta_update no longer accepts lower_bound, allow_neg_eigval by name" in msg
    assert qwen3_5.gated_delta_update is renamed and qwen3_next.gated_delta_update is other


def test_changed_sdpa_signature_fails(monkeypatch):
    monkeypatch.setattr(base, "scaled_dot_product_attention", lambda q, k, v, mask=None: None)
    assert "expected it to start with (queries, keys, values)" in failed(seam.stock_sdpa)
    mod = fake_model_module()
    assert "fake_model.scaled_dot_product_attention" in failed(lambda: seam.hold_sdpa([mod], other_sdpa))
    assert not seam.replaced(mod, "scaled_dot_product_attention")


def test_deleted_private_symbols_fail(monkeypatch):
    monkeypatch.delattr(cache, "_BaseCache")
    monkeypatch.delattr(mlx_lm.utils, "_get_classes")
    assert "mlx_lm.models.cache._BaseCache is missing" in failed(seam.base_cache_class)
    assert "mlx_lm.utils._get_classes is missing" in failed(lambda: seam.model_classes({"model_type": "llama"}))
    # model_io turns only "unsupported model type" into ModelLoadError, not a changed mlx-lm
    with pytest.raises(MlxLmIncompatible):
        check_model_type({"model_type": "llama"})
    assert not issubclass(MlxLmIncompatible, ModelLoadError)
    assert {n for n, p in seam.run_checks().items() if p} == {"_BaseCache", "_get_classes"}


def test_prompt_cache_lookup_change_and_name_clash_fail(monkeypatch):
    class OptiqTestCache:
        pass

    monkeypatch.setattr(cache, "OptiqTestCache", object(), raising=False)
    assert "would shadow OptiQ's cache class" in failed(lambda: seam.hold_cache_classes([OptiqTestCache]))
    registry: dict = {}
    monkeypatch.setattr(cache, "load_prompt_cache", lambda f, return_metadata=False: registry[f])
    assert "no longer looks cache classes up with globals()" in failed(seam.check_prompt_cache_lookup)


def test_changed_switch_linear_and_detokenizer_fail(monkeypatch):
    monkeypatch.setattr(QuantizedSwitchLinear, "__call__", lambda self, x: x)
    assert "QuantizedSwitchLinear.__call__ changed its signature" in failed(seam.switch_linear_class)
    monkeypatch.delattr(BPEStreamingDetokenizer, "_maybe_trim_space")
    assert "_maybe_trim_space is gone" in failed(seam.check_bpe_detokenizer)


def test_unwrappable_call_fails():
    class Builtin:
        __call__ = len

    assert "Builtin.__call__ is not a Python function" in failed(lambda: seam.calls_wrapped([Builtin], lambda f: f).__enter__())
    assert "__call__" not in vars(Builtin) or vars(Builtin)["__call__"] is len
