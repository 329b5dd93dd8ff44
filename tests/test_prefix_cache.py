"""Prefix cache across requests: a cache hit gives the same greedy tokens as a fresh
prefill (dense, hybrid, MoE, mixed-precision KV, adapters), shared prefixes in one
batch do not corrupt each other, and the store stays within its byte budget."""

from __future__ import annotations

import threading
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, QuantizedKVCache

from optiq.runtime.config import ServeConfig, parse_bytes
from optiq.runtime.engine import Engine
from optiq.runtime.loader import make_loader
from optiq.runtime.prefix_cache import PrefixCache, cache_nbytes, compact
from optiq.runtime.types import Delta, GenerationRequest


# ------------------------------------------------------------------ the store alone


def kv(n: int, fill: float = 1.0) -> list:
    c = KVCache()
    c.update_and_fetch(mx.full((1, 1, n, 8), fill), mx.full((1, 1, n, 8), fill))
    return [c]


def hybrid(n: int) -> list:
    a = ArraysCache(1)
    a[0] = mx.full((1, 4), float(n))
    return kv(n) + [a]


def test_longest_prefix_trimmed_and_never_whole_prompt():
    pc = PrefixCache(1 << 30)
    assert pc.fetch(None, [1, 2, 3]) == (None, 0)
    assert pc.insert(None, [1, 2, 3, 4, 5], kv(5))
    cache, n = pc.fetch(None, [1, 2, 3, 9])
    assert n == 3 and cache[0].offset == 3
    cache, n = pc.fetch(None, [1, 2, 3, 4, 5])  # identical prompt: last token recomputed
    assert n == 4 and cache[0].offset == 4
    # the stored entry is not changed by trimming a copy
    cache, n = pc.fetch(None, [1, 2, 3, 4, 5, 6])
    assert n == 5 and cache[0].offset == 5
    assert pc.fetch("adapter", [1, 2, 3, 4, 5, 6]) == (None, 0)  # adapter is part of the key
    # a shorter trimmable prefix of a stored entry adds nothing
    assert not pc.insert(None, [1, 2, 3], kv(3))
    assert len(pc) == 1


def test_recurrent_entries_serve_only_whole_prefixes():
    pc = PrefixCache(1 << 30)
    pc.insert(None, [1, 2, 3, 4], hybrid(4))
    assert pc.fetch(None, [1, 2, 3, 9, 9]) == (None, 0)  # would need trimming
    assert pc.fetch(None, [1, 2, 3, 4]) == (None, 0)  # nothing left to prefill
    cache, n = pc.fetch(None, [1, 2, 3, 4, 7])
    assert n == 4 and cache[1][0].tolist() == [[4.0] * 4]
    pc.insert(None, [1, 2], hybrid(2))  # snapshots of a recurrent model are all kept
    assert len(pc) == 2 and pc.fetch(None, [1, 2, 3, 9])[1] == 2


def test_lru_eviction_within_budget():
    one = cache_nbytes(compact(kv(4)))  # as stored: trimmed to its 4 positions
    pc = PrefixCache(2 * one)
    pc.insert(None, [1, 1, 1, 1], kv(4))
    pc.insert(None, [2, 2, 2, 2], kv(4))
    pc.fetch(None, [1, 1, 1, 1, 5])  # touch the first
    pc.insert(None, [3, 3, 3, 3], kv(4))
    assert pc.nbytes <= 2 * one and pc.stats.evictions == 1
    assert pc.fetch(None, [2, 2, 2, 2, 5]) == (None, 0)
    assert pc.fetch(None, [1, 1, 1, 1, 5])[1] == 4
    assert not PrefixCache(one - 1).insert(None, [1, 2, 3, 4], kv(4))  # never over budget


def stored_arrays(pc: PrefixCache) -> list:
    return [a for e in pc._entries.values() for _, a in tree_flatten([c.state for c in e.cache])
            if isinstance(a, mx.array)]


def test_counted_bytes_are_the_stored_arrays():
    """What the budget counts is the sum of the stored arrays' nbytes: step-allocated
    KV buffers are cut to their used positions (mlx-lm allocates 256 at a time)."""
    from optiq.core.kv.cache import MixedKVCache

    pc = PrefixCache(1 << 30)
    mixed = MixedKVCache(8, 4, 64)
    mixed.update_and_fetch(mx.ones((1, 1, 5, 64)), mx.ones((1, 1, 5, 64)))
    quant = QuantizedKVCache(64, 8)
    quant.update_and_fetch(mx.ones((1, 1, 7, 64)), mx.ones((1, 1, 7, 64)))
    for i, cache in enumerate([kv(3), hybrid(300), [mixed], [quant], [CacheList(*kv(9), *kv(2))]]):
        before = sum(c.nbytes for c in cache)  # step-rounded
        assert pc.insert(None, [i] * 3, cache)
        assert pc.nbytes == sum(a.nbytes for a in stored_arrays(pc))
        assert cache_nbytes(cache) <= before
    assert pc.stats.nbytes < 1 << 20
    k = pc._entries[(None, (1, 1, 1))].cache[0]
    assert k.keys.shape[2] == k.offset == 300
    cache, n = pc.fetch(None, [1, 1, 1, 5])  # a copy regrows in steps when extended
    cache[0].update_and_fetch(mx.ones((1, 1, 2, 8)), mx.ones((1, 1, 2, 8)))
    assert cache[0].offset == 302 and cache[0].keys.shape[2] == 300 + 256
    assert pc._entries[(None, (1, 1, 1))].cache[0].keys.shape[2] == 300  # entry unchanged


def test_entry_from_a_batch_does_not_pin_the_batch():
    """A cache extracted from a batch (one row of its state) is copied out: the stored
    entry's resident memory is its counted bytes, not the batch's buffer."""
    def active() -> int:
        mx.synchronize()
        return mx.get_active_memory()

    batch = ArraysCache(1)
    batch[0] = mx.ones((16, 4, 128, 128))  # 16 rows of 256 KiB
    mx.eval(batch[0])
    row = batch.extract(3)
    pc = PrefixCache(1 << 30)
    base = active() - batch[0].nbytes
    assert pc.insert(None, [1, 2], [row])
    del batch, row
    mx.clear_cache()
    assert pc.nbytes == 4 * 128 * 128 * 4
    assert active() - base <= pc.nbytes + (64 << 10)


def test_parse_bytes():
    assert parse_bytes("0") == 0 and parse_bytes("2GiB") == 2 << 30
    assert parse_bytes("1.5 MB") == 1_500_000


# ------------------------------------------------------------------ the engine


def start(path: Path, cache_bytes: int, step: int = 512, **cfg) -> Engine:
    e = Engine(make_loader(ServeConfig(model=path, **cfg), path), prefill_step_size=step,
               prompt_cache_bytes=cache_bytes)
    e.start()
    assert e.wait_ready(180)
    return e


def run(e: Engine, prompt: list[int] | GenerationRequest, n: int = 6, adapter: str | None = None):
    req = prompt if isinstance(prompt, GenerationRequest) else GenerationRequest(
        "t", list(prompt), n, ignore_eos=True, adapter=adapter)
    h = e.submit(req)
    ids, fin = [], None
    for events in h.events():
        for ev in events:
            if isinstance(ev, Delta):
                ids += ev.token_ids
            else:
                fin = ev
    assert fin is not None and not fin.error, fin
    return ids, fin.usage.cached_tokens


def check_conversation(path: Path, trimmable: bool, use=(None,), **cfg) -> None:
    """Three turns, a retry and a diverging prompt, each equal to a no-cache engine."""
    for step in (512, 3):  # the engine's own first-token prefill; BatchGenerator's
        hot, cold = start(path, 1 << 30, step, **cfg), start(path, 0, step, **cfg)
        try:
            tok = hot.tokenizer
            for adapter in use:
                p = tok.encode("Once upon a time there was a little")
                snapshot = len(p) - 1  # the first prompt's snapshot: a prefix of everything
                history = []
                for turn in range(3):
                    prompt = history + p
                    got, cached = run(hot, prompt, adapter=adapter)
                    want, none = run(cold, prompt, adapter=adapter)
                    assert got == want, (turn, step, adapter)
                    assert none == 0
                    # turn > 0 reuses the whole previous prompt + answer
                    assert cached == (len(history) if turn else 0), (turn, step, adapter)
                    history = prompt + got
                    p = tok.encode(" and then")
                # retry of the same prompt: all but the last token come from the snapshot
                got, cached = run(hot, prompt, adapter=adapter)
                assert got == want and cached == len(prompt) - 1
                # a prompt diverging inside the history: trimmable caches serve the
                # common prefix, recurrent ones the longest snapshot inside it
                other = prompt[:snapshot + 2] + tok.encode(" dragon")
                got, cached = run(hot, other, adapter=adapter)
                assert got == run(cold, other, adapter=adapter)[0]
                assert cached == (snapshot + 2 if trimmable else snapshot), (cached, step)
            load = hot.load()
            assert load.prompt_cache_hits > 0 and load.prompt_cache_bytes > 0
            assert load.prompt_cache_bytes <= hot.prompt_cache_bytes
        finally:
            hot.stop()
            cold.stop()


@pytest.mark.slow
def test_hybrid_bundled_model(bundled_model_dir):
    check_conversation(Path(bundled_model_dir), trimmable=False)


@pytest.mark.slow
def test_dense_model(tmp_path):
    from optiq.core.tiny_models import make_random_llama

    check_conversation(make_random_llama(tmp_path / "llama", hidden=128, num_layers=2),
                       trimmable=True)


@pytest.mark.slow
def test_moe_model(tiny_moe_dir):
    check_conversation(Path(tiny_moe_dir), trimmable=False)


@pytest.mark.slow
def test_mixed_kv_and_adapters(bundled_model_dir, tmp_path):
    from test_runtime_server import make_adapter

    from optiq.core.kv import kv_layout, save_kv_config, uniform_kv_config
    from optiq.core.model_io import load_model

    ref = load_model(bundled_model_dir)
    kv_file = save_kv_config(uniform_kv_config(kv_layout(ref.model), 8, 4),
                             tmp_path / "kv_config.json")
    adapters = {"alpha": make_adapter(ref.model, tmp_path / "alpha", 1)}
    check_conversation(Path(bundled_model_dir), trimmable=False, use=(None, "alpha"),
                       kv_config=kv_file, adapters=adapters)


@pytest.mark.slow
def test_shared_prefix_in_one_batch(bundled_model_dir):
    """Requests extending one cached prefix, decoded together, each match a solo run
    without the cache; running them again (now from their own entries) still does."""
    path = Path(bundled_model_dir)
    hot, cold = start(path, 1 << 30, step=4), start(path, 0, step=4)
    try:
        tok = hot.tokenizer
        base = tok.encode("The little dog ran to the park and")
        run(hot, base, n=2)
        prompts = [base + tok.encode(s) for s in (" saw", " met a", " found the big", " ate")]
        want = [run(cold, p)[0] for p in prompts]
        for _ in range(2):
            results: dict[int, tuple] = {}
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(hot, prompts[i])))
                       for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert [results[i][0] for i in range(len(prompts))] == want
            assert all(results[i][1] > 0 for i in range(len(prompts)))
    finally:
        hot.stop()
        cold.stop()


# ------------------------------------------------------- chat message boundaries

TOOLS = " ".join(f"tool_{i}(query: str, limit: int) returns the rows of table {i} that match."
                 for i in range(12))


def chat(e: Engine, msgs: list[tuple[str, str]], n: int = 6) -> GenerationRequest:
    """The engine request the gRPC service builds for these messages."""
    from optiq.v1 import generation_pb2 as pb

    from optiq.runtime.config import Defaults
    from optiq.runtime.service import build_request

    r = pb.GenerateRequest(messages=[pb.ChatMessage(role=a, content=b) for a, b in msgs],
                           max_tokens=n, ignore_eos=True)
    return build_request(r, e, Defaults())


def longest_shared_boundary(earlier: GenerationRequest, later: GenerationRequest) -> int:
    p, q = earlier.prompt_tokens, later.prompt_tokens
    return max([b for b in earlier.boundaries if p[:b] == q[:b] and b < len(q) - 1], default=0)


@pytest.mark.slow
def test_hybrid_resumes_at_message_boundaries(bundled_model_dir):
    """A new agent session on the same system prompt, and an edited last message, resume
    from the snapshot taken where the shared messages end; outputs equal a cold engine's
    (both prefill paths), and GetLoad counts the hits and reused tokens."""
    from optiq.v1 import generation_pb2 as pb

    from optiq.runtime.config import Defaults
    from optiq.runtime.service import GenerationService

    path = Path(bundled_model_dir)
    system = ("system", "You are an agent. Call one tool per step. Tools: " + TOOLS)
    for step in (512, 8):  # the engine's own first-token prefill; BatchGenerator's
        hot, cold = start(path, 1 << 30, step), start(path, 0, step)
        try:
            load = lambda: GenerationService(hot, Defaults()).GetLoad(pb.GetLoadRequest(), None)
            assert hot.snapshots_boundaries and not cold.snapshots_boundaries
            first = chat(hot, [system, ("user", "Find the rows about cats.")])
            assert chat(cold, [system, ("user", "x")]).boundaries == ()  # cache off: none
            assert len(first.boundaries) == 2  # system end, user end
            got, cached = run(hot, first)
            answer = hot.tokenizer.decode(got)
            assert cached == 0 and got == run(cold, first)[0]

            # a new session: same system prompt and tools, another first user message
            other = chat(hot, [system, ("user", "Sum the prices in table 3.")])
            before = load()
            got, cached = run(hot, other)
            assert cached == first.boundaries[0] == longest_shared_boundary(first, other)
            assert got == run(cold, other)[0], step
            after = load()
            assert after.prompt_cache_hits == before.prompt_cache_hits + 1
            assert after.prompt_cache_tokens_total == before.prompt_cache_tokens_total + cached

            # the next turn, then the same turn with its last message edited: it resumes
            # where the assistant's answer (and the next user header) ends
            history = [system, ("user", "Find the rows about cats."), ("assistant", answer)]
            turn = chat(hot, history + [("user", "Now only the black ones, please.")])
            got, cached = run(hot, turn)
            assert cached > 0 and got == run(cold, turn)[0]
            edited = chat(hot, history + [("user", "Now only the white ones.")])
            want = longest_shared_boundary(turn, edited)
            assert want > len(first.prompt_tokens)  # past the whole first prompt
            got, cached = run(hot, edited)
            assert cached == want and got == run(cold, edited)[0], step
            assert load().prompt_cache_bytes <= hot.prompt_cache_bytes
        finally:
            hot.stop()
            cold.stop()
