"""Continuous-batching generation engine on one dedicated thread.

All MLX state (model, caches, ``BatchGenerator``, random state) is created and used
on the engine thread only. RPC handler threads talk to it through queues: they
``submit`` a tokenized :class:`GenerationRequest` and read :class:`Delta` /
:class:`Finished` events from the returned :class:`RequestHandle`; ``cancel`` takes a
request out of the running batch before the next decode step.

Admission: at most ``max_concurrency`` requests hold a batch slot; up to ``max_queue``
more wait. Beyond that ``submit`` raises :class:`QueueFull` (RESOURCE_EXHAUSTED).

Prefix cache (:mod:`optiq.runtime.prefix_cache`): a request starts from a copy of the
cache of the longest cached prefix of its prompt and prefills only the rest. The engine
stores a request's cache twice: after its prompt minus the last token (a snapshot; the
only reusable point of a recurrent model for a retry or for concurrent requests with
the same prompt) and when it ends (prompt + answer: the next turn of a chat extends it).
A hybrid model's prefill is also cut at the message boundaries of a chat input
(``GenerationRequest.boundaries``, at most ``boundaries.MAX_BOUNDARIES`` past the reused
prefix) and snapshotted there, so a request sharing the conversation up to an earlier
message resumes from that message.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from optiq.core.errors import OptiQError

from .modelinfo import ModelSummary
from .output import OutputProcessor
from .boundaries import MAX_BOUNDARIES
from .prefix_cache import PrefixCache, default_max_bytes, is_trimmable
from .types import (
    CANCELLED,
    EOS,
    ERROR,
    LENGTH,
    STOP,
    TOOL_CALLS,
    Event,
    Finished,
    GenerationRequest,
    TokenLogprob,
    TopToken,
    Usage,
)

log = logging.getLogger("optiq.runtime")


class EngineError(OptiQError):
    """The engine cannot take this request now."""


class QueueFull(EngineError):
    """Every batch slot and queue place is taken."""


class NotServing(EngineError):
    """The engine is loading, draining or stopped."""


@dataclass
class LoadedEngineModel:
    """What the loader hands the engine: built on the engine thread."""

    model: Any  # what BatchGenerator runs
    tokenizer: Any
    summary: ModelSummary
    # adapter name (or None) -> a fresh cache list for one request; None: mlx-lm's default
    make_cache: Callable[[str | None], list] | None = None
    # registered adapter name -> description (has .num_layers)
    adapters: dict[str, Any] = field(default_factory=dict)


_END = object()  # handler-side sentinel: the request was cancelled by the client


@dataclass
class _First:
    """The first token of a request sampled outside the batch (shaped like a
    ``GenerationBatch.Response``)."""

    token: int
    logprobs: Any
    finish_reason: str | None


class RequestHandle:
    """The handler's side of one request.

    Blocking readers iterate :meth:`events`; an asyncio reader passes ``notify`` (called
    on the engine thread after each event, e.g. ``loop.call_soon_threadsafe``) and takes
    what is ready with :meth:`poll`.
    """

    def __init__(self, request: GenerationRequest, notify: Callable[[], None] | None = None):
        self.request = request
        self.received = time.perf_counter()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._notify = notify
        self.cancelled = False
        self.done = False

    def poll(self) -> list[Event]:
        """The events ready now, without waiting; ``done`` turns True after the last one
        (``Finished``, or a client cancel)."""
        out: list[Event] = []
        while not self.done:
            try:
                e = self._events.get_nowait()
            except queue.Empty:
                break
            self._accept(e, out)
        return out

    def events(self) -> Iterator[list[Event]]:
        """Batches of events as they arrive (all that are ready at once); ends after
        ``Finished`` or a client cancel."""
        while not self.done:
            batch: list[Event] = []
            self._accept(self._events.get(), batch)
            batch += self.poll()
            if batch:
                yield batch

    def _accept(self, e: Any, out: list[Event]) -> None:
        if e is _END:
            self.done = True
            return
        out.append(e)
        if isinstance(e, Finished):
            self.done = True

    def _put(self, ev: Any) -> None:
        self._events.put(ev)
        if self._notify is not None:
            self._notify()


@dataclass
class _State:
    handle: RequestHandle
    out: OutputProcessor | None = None
    uid: int | None = None
    admitted: float = 0.0
    first: float | None = None
    last: float | None = None
    done: bool = False
    cache: list | None = None  # from the prefix cache (or fresh), until inserted in the batch
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    cuts: list[int] = field(default_factory=list)  # boundaries to snapshot at in prefill


@dataclass
class EngineStats:
    active: int = 0
    queued: int = 0
    requests_total: int = 0
    cancelled: int = 0
    rejected: int = 0  # refused: at capacity (RESOURCE_EXHAUSTED)
    invalid: int = 0  # refused: a request the client must fix (INVALID_ARGUMENT)
    failed: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    decode_steps: int = 0
    prompt_cache_lookups: int = 0
    prompt_cache_hits: int = 0
    prompt_cache_tokens: int = 0  # prompt tokens reused instead of prefilled
    prompt_cache_bytes: int = 0
    prompt_cache_entries: int = 0
    prompt_cache_evictions: int = 0


def _segments(prompt: list[int], start: int, cuts: list[int]) -> list[list[int]]:
    """``prompt[start:]`` cut at ``cuts`` (sorted offsets inside it)."""
    points = [start, *(c for c in cuts if start < c < len(prompt)), len(prompt)]
    return [prompt[a:b] for a, b in zip(points, points[1:])]


class Engine:
    """Owns the generation thread. ``loader`` runs on that thread and returns a
    :class:`LoadedEngineModel`."""

    def __init__(
        self,
        loader: Callable[[], LoadedEngineModel],
        *,
        max_concurrency: int = 8,
        max_queue: int = 64,
        prefill_step_size: int = 512,
        prompt_cache_bytes: int | None = None,
    ):
        """``prompt_cache_bytes``: budget of the prefix cache (None: a fraction of the
        machine's memory, :func:`optiq.runtime.prefix_cache.default_max_bytes`; 0: off)."""
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self._loader = loader
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.prefill_step_size = prefill_step_size
        if prompt_cache_bytes is not None and prompt_cache_bytes < 0:
            raise ValueError("prompt_cache_bytes must be >= 0")
        self.prompt_cache_bytes = (
            default_max_bytes() if prompt_cache_bytes is None else int(prompt_cache_bytes)
        )
        self._prefix: PrefixCache | None = None  # engine thread only
        self._recurrent = False  # a fresh cache cannot be trimmed (hybrid model); set at load
        self.tokenizer_lock = threading.Lock()
        self.loaded: LoadedEngineModel | None = None
        self.load_error: BaseException | None = None
        self.started_at = time.time()
        self.stats = EngineStats()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _outstanding, _draining, stats counters
        self._outstanding = 0
        self._draining = False
        self._by_handle: dict[int, _State] = {}  # engine thread only
        self._thread = threading.Thread(target=self._main, name="optiq-engine", daemon=True)

    # ----------------------------------------------------------------- public API
    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once loaded; raises the loader's error if loading failed."""
        ok = self._ready.wait(timeout)
        if self.load_error is not None:
            raise self.load_error
        return ok and self.loaded is not None

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    @property
    def serving(self) -> bool:
        return self.loaded is not None and not self._draining and not self._stopped.is_set()

    @property
    def snapshots_boundaries(self) -> bool:
        """Whether chat message boundaries are worth finding: the engine snapshots a
        hybrid model there (a trimmable cache serves every prefix anyway)."""
        return self.prompt_cache_bytes > 0 and self._recurrent

    @property
    def summary(self) -> ModelSummary:
        if self.loaded is None:
            raise NotServing("the model is still loading")
        return self.loaded.summary

    @property
    def tokenizer(self) -> Any:
        if self.loaded is None:
            raise NotServing("the model is still loading")
        return self.loaded.tokenizer

    @property
    def adapter_names(self) -> list[str]:
        return sorted(self.loaded.adapters) if self.loaded else []

    def submit(self, request: GenerationRequest,
               notify: Callable[[], None] | None = None) -> RequestHandle:
        """Queue ``request``; ``notify`` (optional) is called after each of its events."""
        handle = RequestHandle(request, notify)
        with self._lock:
            if not self.serving:
                raise NotServing(
                    "the engine has stopped" if self._stopped.is_set()
                    else "the server is draining" if self._draining
                    else "the model is still loading"
                )
            if self._outstanding >= self.max_concurrency + self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(
                    f"server at capacity: {self.max_concurrency} running and "
                    f"{self.max_queue} queued requests; retry later"
                )
            self._outstanding += 1
            self.stats.requests_total += 1
            # under the lock: once the engine thread has stopped, nothing new gets in
            self._inbox.put(("submit", handle))
        return handle

    def count_invalid(self) -> None:
        """Count a request refused before submission as invalid (GetLoad.requests_invalid)."""
        with self._lock:
            self.stats.invalid += 1

    def cancel(self, handle: RequestHandle) -> None:
        """Client-side cancel (RPC cancelled, disconnected, deadline): frees the slot
        before the next decode step. Safe to call more than once or after the end."""
        if handle.cancelled:
            return
        handle.cancelled = True
        handle._put(_END)
        self._inbox.put(("cancel", handle))

    def load(self) -> EngineStats:
        with self._lock:
            s = EngineStats(**vars(self.stats))
        return s

    def drain(self, grace: float) -> None:
        """Stop taking requests, let running ones finish for up to ``grace`` seconds,
        then end the rest with reason CANCELLED."""
        with self._lock:
            self._draining = True
        deadline = time.monotonic() + max(grace, 0.0)
        while True:
            with self._lock:
                if self._outstanding == 0:
                    return
            if time.monotonic() >= deadline or not self._thread.is_alive():
                break
            time.sleep(0.02)
        if self._thread.is_alive():
            done = threading.Event()
            self._inbox.put(("cancel_all", done))
            done.wait(5.0)

    def stop(self, timeout: float = 5.0) -> None:
        """End the engine thread (after ``drain`` for a graceful stop)."""
        with self._lock:
            self._draining = True
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ----------------------------------------------------------- engine thread
    def _main(self) -> None:
        from optiq.core.cpu import dequantize_in_slices

        with contextlib.ExitStack() as held, dequantize_in_slices():  # prefill: one weight slice at a time
            self._serve(held)

    def _serve(self, held: contextlib.ExitStack) -> None:
        from optiq.core.quant.gdn import fast_gated_delta

        try:
            loaded = self._loader()
            # the model's mlx-lm module is imported now: its Gated DeltaNet prefill (one
            # unpadded sequence) runs chunked on the CPU; decode and masked batches stay stock
            held.enter_context(fast_gated_delta())
        except BaseException as e:  # reported by wait_ready
            self.load_error = e
            self._ready.set()
            self._stopped.set()
            return
        try:
            self._warmup(loaded)
        except Exception:  # a failed warm-up is not fatal; the first request pays instead
            log.exception("warm-up failed")
        try:
            self._recurrent = not is_trimmable(self._fresh_cache(loaded, None))
        except Exception:  # a cache factory that needs a request: no boundary snapshots
            log.exception("could not inspect the model's cache")
        self.loaded = loaded
        self._ready.set()
        try:
            self._loop(loaded)
        except BaseException as e:
            log.exception("generation thread crashed")
            self._fail_all(f"engine stopped: {type(e).__name__}: {e}")
            raise
        finally:
            with self._lock:
                self._stopped.set()
            self._fail_all("engine stopped")

    def _fail_all(self, message: str) -> None:
        """No handler may wait forever: end every unfinished request (also those still
        in the inbox) when the engine thread ends."""
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                self._by_handle[id(arg)] = _State(arg)
            elif kind == "cancel_all":
                arg.set()
        for st in list(self._by_handle.values()):
            self._finish(st, self._by_handle, ERROR, error=message)

    def _warmup(self, lm: LoadedEngineModel) -> None:
        """Run two short requests so MLX compiles its kernels before the first client
        request (otherwise its time to first token includes seconds of JIT)."""
        bg = self._new_generator(lm)
        t = lm.summary.eos_token_ids[0] if lm.summary.eos_token_ids else 0
        caches = [lm.make_cache(None) for _ in range(2)] if lm.make_cache else None
        bg.insert([[t] * 3, [t] * 6], max_tokens=[4, 4], caches=caches)
        finished = 0
        for _ in range(32):
            _, rs = bg.next()
            finished += sum(r.finish_reason is not None for r in rs)
            if finished == 2:
                break
        bg.close()

    def _new_generator(self, lm: LoadedEngineModel) -> Any:
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(
            lm.model,
            completion_batch_size=self.max_concurrency,
            prefill_batch_size=min(self.max_concurrency, 8),
            prefill_step_size=self.prefill_step_size,
            stream=mx.default_stream(mx.default_device()),
        )

    def _loop(self, lm: LoadedEngineModel) -> None:
        from mlx_lm.generate import StopSequences

        self._lm = lm
        self._stop_sets: dict[frozenset[int], Any] = {}
        self._StopSequences = StopSequences
        self._prefix = PrefixCache(self.prompt_cache_bytes) if self.prompt_cache_bytes else None
        bg = self._new_generator(lm)
        waiting: deque[_State] = deque()
        running: dict[int, _State] = {}  # uid -> state
        by_handle = self._by_handle  # id(handle) -> state (every unfinished request)

        while True:
            idle = not running and not waiting
            try:
                cmds = [self._inbox.get(timeout=0.25) if idle else self._inbox.get_nowait()]
            except queue.Empty:
                cmds = []
            while True:
                try:
                    cmds.append(self._inbox.get_nowait())
                except queue.Empty:
                    break

            for kind, arg in cmds:
                if kind == "submit":
                    st = _State(arg)
                    by_handle[id(arg)] = st
                    waiting.append(st)
                elif kind == "cancel":
                    st = by_handle.get(id(arg))
                    if st is None or st.done:
                        continue
                    if st.uid is not None:
                        self._remove(bg, [st])
                        running.pop(st.uid, None)
                    else:
                        waiting.remove(st)
                    self._finish(st, by_handle, CANCELLED, error="cancelled by the client")
                elif kind == "cancel_all":
                    for st in list(waiting) + list(running.values()):
                        if st.uid is not None:
                            bg.remove([st.uid])
                        self._finish(st, by_handle, CANCELLED, error="server shutting down")
                    waiting.clear()
                    running.clear()
                    arg.set()
                elif kind == "stop":
                    for st in list(waiting) + list(running.values()):
                        self._finish(st, by_handle, CANCELLED, error="server stopped")
                    bg.close()
                    return

            admit = []
            while waiting and len(running) + len(admit) < self.max_concurrency:
                admit.append(waiting.popleft())
            for st in admit:
                try:
                    self._lookup(st)
                    st.cuts = self._cuts(st)
                    # A lone short prompt (what is left after the cached prefix) is
                    # prefilled here and its first token sent at once (the batch path
                    # needs one more engine step before the first token); several new
                    # prompts are prefilled together by BatchGenerator.
                    rest = len(st.handle.request.prompt_tokens) - st.cached_tokens
                    fast = len(admit) == 1 and rest <= self.prefill_step_size
                    if self._admit(bg, st, first_token_now=fast, by_handle=by_handle):
                        running[st.uid] = st
                except Exception as e:  # e.g. a cache factory that fails for this input
                    log.exception("could not start request %s", st.handle.request.request_id)
                    self._finish(st, by_handle, ERROR, error=f"{type(e).__name__}: {e}")

            with self._lock:
                self.stats.active = len(running)
                self.stats.queued = len(waiting)
            if not running:
                continue

            try:
                prompt_responses, responses = bg.next()
                self._snapshot(bg, prompt_responses, running)
            except Exception as e:
                log.exception("generation step failed; failing %d requests", len(running))
                for st in running.values():
                    self._finish(st, by_handle, ERROR, error=f"{type(e).__name__}: {e}")
                running.clear()
                bg.close()
                bg = self._new_generator(lm)
                continue

            if responses:
                with self._lock:
                    self.stats.decode_steps += 1
                    self.stats.generated_tokens += len(responses)
            remove = []
            states = [running[r.uid] for r in responses if r.uid in running]
            now = time.perf_counter()
            for r in responses:
                st = running.get(r.uid)
                if st is None:
                    continue
                try:
                    ended = self._on_token(st, r, now, by_handle)
                except Exception as e:
                    log.exception("output processing failed")
                    self._finish(st, by_handle, ERROR, error=f"{type(e).__name__}: {e}")
                    ended = True
                    if r.finish_reason is None:
                        remove.append(r.uid)
                if ended:
                    running.pop(r.uid, None)
                    if r.finish_reason is None and st.out is not None and st.out.stopped:
                        remove.append(r.uid)
                if r.finish_reason is not None and r.prompt_cache is not None:
                    self._keep(st.handle.request, r.all_tokens, r.prompt_cache)
            if remove:
                self._remove(bg, [st for st in states if st.uid in set(remove)])

    def _stop_sequences(self, req: GenerationRequest) -> Any:
        key = self._stop_id_set(req)
        ss = self._stop_sets.get(key)
        if ss is None:
            ss = self._StopSequences([(t,) for t in sorted(key)] or None)
            if len(self._stop_sets) > 256:
                self._stop_sets.clear()
            self._stop_sets[key] = ss
        return ss

    def _admit(self, bg: Any, st: _State, *, first_token_now: bool, by_handle: dict) -> bool:
        """Start a request; False if it already ended (first token was its last)."""
        from .sampling import make_processors, make_sampler

        lm = self._lm
        req = st.handle.request
        room = lm.summary.context_length - len(req.prompt_tokens)
        max_tokens = max(1, min(req.max_tokens, room))
        tags = lm.summary.tool_tags
        st.out = OutputProcessor(
            lm.tokenizer.detokenizer,
            stops=req.stop,
            think_tags=lm.summary.think_tags,
            initial_channel=req.initial_channel,
            tool_format=(*tags, lm.tokenizer.tool_parser) if tags and req.tools else None,
            tools=req.tools,
        )
        st.admitted = time.perf_counter()
        with self._lock:
            self.stats.prompt_tokens += len(req.prompt_tokens)
        sampler = make_sampler(req.sampling, lm.summary.vocab_size)
        processors = make_processors(req.sampling)
        stops = self._stop_sequences(req)
        cache, reused = st.cache, st.cached_tokens
        st.cache = None  # the batch (or the prefix cache) owns it from here
        segments = _segments(req.prompt_tokens, reused, st.cuts)
        all_tokens = [list(req.prompt_tokens[:reused])]
        if first_token_now:
            token, row = self._first_token(bg, req, reused, cache, sampler, processors, st.cuts)
            stop_ids = self._stop_id_set(req)
            reason = "stop" if token in stop_ids else "length" if max_tokens == 1 else None
            with self._lock:
                self.stats.generated_tokens += 1
            first = _First(token, row, reason)
            ended = self._on_token(st, first, time.perf_counter(), by_handle)
            # let the RPC thread send the first token now rather than after the batch
            # bookkeeping below (up to a GIL switch interval later)
            time.sleep(0)
            if ended:
                self._keep(req, req.prompt_tokens, cache)
                return False
            segments, all_tokens, max_tokens = [[token]], [list(req.prompt_tokens)], max_tokens - 1
        # BatchGenerator stops at each segment's end: _snapshot keeps the cache there
        (st.uid,) = bg.insert_segments(
            [segments],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=all_tokens,
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[stops],
        )
        return True

    def _first_token(self, bg: Any, req: GenerationRequest, reused: int, cache: list,
                     sampler: Any, processors: list, cuts: list[int]) -> tuple[int, Any]:
        """Prefill the prompt after its first ``reused`` tokens (already in ``cache``)
        and sample the first token, exactly as the batch would (same processors,
        sampler and stream). Like the batch, it snapshots the cache at each of ``cuts``
        and before the last prompt token for the prefix cache."""
        import mlx.core as mx

        prompt = req.prompt_tokens
        with mx.stream(bg.stream):
            start = reused
            for end in [*cuts, len(prompt) - 1]:
                if end <= start:
                    continue
                self._lm.model(mx.array(prompt[start:end])[None], cache=cache)
                mx.eval([c.state for c in cache])
                if self._prefix is not None:
                    self._keep(req, prompt[:end], copy.deepcopy(cache))
                start = end
            tokens = mx.array(prompt)
            logits = self._lm.model(tokens[None, -1:], cache=cache)[:, -1, :]
            for p in processors:
                logits = p(tokens, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            y = sampler(logprobs) if sampler is not None else mx.argmax(logprobs, axis=-1)
            mx.eval(y, logprobs)
        return int(y.item()), logprobs[0]

    # ------------------------------------------------------------- prefix cache
    def _lookup(self, st: _State) -> None:
        """Give ``st`` its starting cache: a copy of the longest cached prefix of its
        prompt, or a fresh one."""
        lm, req = self._lm, st.handle.request
        cache, reused = (
            self._prefix.fetch(req.adapter, req.prompt_tokens) if self._prefix is not None else (None, 0)
        )
        if cache is None:
            cache = self._fresh_cache(lm, req.adapter)
        st.cache, st.cached_tokens = cache, reused
        self._cache_stats()

    @staticmethod
    def _fresh_cache(lm: LoadedEngineModel, adapter: str | None) -> list:
        if lm.make_cache is not None:
            return lm.make_cache(adapter)
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(lm.model)

    def _cuts(self, st: _State) -> list[int]:
        """The message boundaries to snapshot ``st``'s prefill at: only for a cache that
        cannot be trimmed (a trimmable entry serves every prefix), only past the reused
        prefix, at most MAX_BOUNDARIES (the first and the last ones)."""
        req = st.handle.request
        if self._prefix is None or not req.boundaries or is_trimmable(st.cache):
            return []
        n = len(req.prompt_tokens)
        cuts = sorted({b for b in req.boundaries if st.cached_tokens < b < n - 1})
        if len(cuts) > MAX_BOUNDARIES:
            cuts = cuts[:1] + cuts[len(cuts) - MAX_BOUNDARIES + 1:]
        return cuts

    def _keep(self, req: GenerationRequest, tokens: list[int], cache: list) -> None:
        """Offer ``cache`` (holding exactly ``tokens``, owned by nobody else) to the
        prefix cache."""
        if self._prefix is None or cache is None:
            return
        self._prefix.insert(req.adapter, list(tokens), cache)
        self._cache_stats()

    def _snapshot(self, bg: Any, prompt_responses: list, running: dict[int, _State]) -> None:
        """Keep the cache of every request whose prompt (all but its last token) the
        batch has just prefilled."""
        if self._prefix is None:
            return
        done = [r.uid for r in prompt_responses
                if r.end_of_segment and not r.end_of_prompt and r.uid in running]
        if done:
            for uid, (cache, tokens) in bg.extract_cache(done).items():
                self._keep(running[uid].handle.request, tokens, cache)

    def _remove(self, bg: Any, states: list[_State]) -> None:
        """Take requests out of the batch; what they computed goes to the prefix cache."""
        uids = [st.uid for st in states]
        caches = bg.remove(uids, return_prompt_caches=self._prefix is not None)
        for st in states:
            if st.uid in caches:
                cache, tokens = caches[st.uid]
                self._keep(st.handle.request, tokens, cache)

    def _cache_stats(self) -> None:
        if self._prefix is None:
            return
        p = self._prefix.stats
        with self._lock:
            s = self.stats
            s.prompt_cache_lookups, s.prompt_cache_hits = p.lookups, p.hits
            s.prompt_cache_tokens, s.prompt_cache_bytes = p.tokens_reused, p.nbytes
            s.prompt_cache_entries, s.prompt_cache_evictions = p.entries, p.evictions

    def _stop_id_set(self, req: GenerationRequest) -> frozenset[int]:
        ids = set(req.stop_token_ids)
        if not req.ignore_eos:
            ids |= set(self._lm.summary.eos_token_ids)
        return frozenset(ids)

    def _logprob(self, req: GenerationRequest, row: Any, token: int) -> TokenLogprob:
        import mlx.core as mx

        with self.tokenizer_lock:
            text = self._lm.tokenizer.decode([token])
        lp = TokenLogprob(token, float(row[token].item()), text="" if "\ufffd" in text else text)
        k = min(req.top_logprobs, row.shape[-1])
        if k > 0:
            idx = mx.argpartition(-row, kth=k - 1)[:k]
            vals = row[idx]
            pairs = sorted(zip(idx.tolist(), vals.tolist()), key=lambda p: -p[1])
            with self.tokenizer_lock:
                texts = [self._lm.tokenizer.decode([i]) for i, _ in pairs]
            lp.top = [
                TopToken(i, v, "" if "\ufffd" in t else t) for (i, v), t in zip(pairs, texts)
            ]
        return lp

    def _on_token(self, st: _State, r: Any, now: float, by_handle: dict) -> bool:
        """Process one generated token; True when the request ended."""
        req = st.handle.request
        token = int(r.token)
        stop_token = r.finish_reason == "stop"
        last = r.finish_reason == "length"
        lp = self._logprob(req, r.logprobs, token) if req.logprobs and not stop_token else None
        if st.first is None:
            st.first = now
        st.last = now
        for d in st.out.step(token, stop_token=stop_token, last=last, logprob=lp):
            st.handle._put(d)
        if stop_token:
            reason = STOP if token in req.stop_token_ids else EOS
            reason = TOOL_CALLS if st.out.tool_calls else reason
            self._finish(st, by_handle, reason, stop_token_id=token)
            return True
        if st.out.stopped is not None:
            reason = TOOL_CALLS if st.out.tool_calls else STOP
            self._finish(st, by_handle, reason, stop_sequence=st.out.stopped)
            return True
        if last:
            self._finish(st, by_handle, LENGTH)
            return True
        return False

    def _finish(self, st: _State, by_handle: dict, reason: str, **kw: Any) -> None:
        if st.done:
            return
        st.done = True
        by_handle.pop(id(st.handle), None)
        end = time.perf_counter()
        h = st.handle
        usage = Usage(
            prompt_tokens=len(h.request.prompt_tokens),
            cached_tokens=st.cached_tokens,
            completion_tokens=st.out.completion_tokens if st.out else 0,
            reasoning_tokens=st.out.reasoning_tokens if st.out else 0,
            queue_time_ms=((st.admitted or end) - h.received) * 1e3,
            time_to_first_token_ms=((st.first - h.received) * 1e3) if st.first else 0.0,
            decode_time_ms=((st.last - st.first) * 1e3) if st.first else 0.0,
            total_time_ms=(end - h.received) * 1e3,
        )
        h._put(Finished(reason, usage, **kw))
        if log.isEnabledFor(logging.INFO):
            log.info(
                "request %s: %s%s; %d prompt + %d generated tokens; TTFT %.1f ms; total %.1f ms",
                h.request.request_id, reason, f" ({kw['error']})" if kw.get("error") else "",
                usage.prompt_tokens, usage.completion_tokens, usage.time_to_first_token_ms,
                usage.total_time_ms,
            )
        with self._lock:
            self._outstanding -= 1
            if reason == CANCELLED:
                self.stats.cancelled += 1
            elif reason == ERROR:
                self.stats.failed += 1
