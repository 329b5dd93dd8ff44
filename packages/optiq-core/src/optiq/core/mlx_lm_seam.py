"""The one place where OptiQ reaches into mlx-lm's internals.

OptiQ relies on things mlx-lm does not promise to keep: it swaps functions that model
modules imported by name (``gated_delta_update``, ``scaled_dot_product_attention``),
wraps decoder classes' ``__call__`` (gradient checkpointing), registers its cache classes
in ``mlx_lm.models.cache`` (stock ``load_prompt_cache`` looks class names up there), and
reads private helpers (``_BaseCache``, ``mlx_lm.utils._get_classes``, the BPE
detokenizer's streaming state). All of it lives here, so an mlx-lm upgrade is checked in
one file: each patch and accessor first checks the signature or symbol it relies on and
raises :class:`~optiq.core.errors.MlxLmIncompatible` naming the installed version and
what changed; :func:`check_all` runs every check at once (tests, ``optiq info``).

Patches are context managers that restore the original on exit, also on an exception.
They are reference-counted per patched attribute under one lock: nested or overlapping
holders (also on other threads, such as the server's generation thread) share one
replacement, and the original comes back when the last holder leaves. A module or class
attribute is seen by every thread, so each replacement behaves exactly like the stock
function for every call it does not handle itself. Patches a caller needs for the life
of the process (a served model's attention, the cache class names) are taken with the
``hold_*`` functions and given back with the matching ``release_*``.

mlx-lm is imported lazily: importing this module loads no MLX.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import MlxLmIncompatible, PatchConflict

TESTED_WITH = "0.32.2"  # the mlx-lm version uv.lock pins and the test suite runs against

GATED_DELTA_UPDATE = (("q", "k", "v", "a", "b", "A_log", "dt_bias", "state", "mask"),
                      ("use_kernel", "lower_bound", "allow_neg_eigval"))
GATED_DELTA_OPS = (("q", "k", "v", "g", "beta", "state", "mask"), ())
COMPUTE_G = (("A_log", "a", "dt_bias"), ())
COMPUTE_LOWER_BOUND_G = (("A_log", "a", "dt_bias", "lower_bound"), ())
SDPA = (("queries", "keys", "values"), ("cache", "scale", "mask", "sinks"))
GET_CLASSES = (("config",), ())
SWITCH_LINEAR_CALL = (("self", "x", "indices"), ("sorted_indices",))
BASE_CACHE_MEMBERS = ("state", "from_state", "is_trimmable", "size", "nbytes", "empty")


def mlx_lm_version() -> str:
    try:
        return importlib.metadata.version("mlx-lm")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def incompatible(what: str, change: str) -> MlxLmIncompatible:
    """The error for an mlx-lm internal that is not what OptiQ's patch expects."""
    return MlxLmIncompatible(
        f"mlx-lm {mlx_lm_version()}: {what} {change}; OptiQ patches or reads it "
        f"(tested with mlx-lm {TESTED_WITH}). Install that version (`uv sync --locked`) "
        "or adapt optiq/core/mlx_lm_seam.py"
    )


def require_params(fn: Any, where: str, spec: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    """Raise unless ``fn`` takes ``spec[0]`` first, positionally, and accepts ``spec[1]`` by name."""
    positional, keyword = spec
    if not callable(fn):
        raise incompatible(where, "is missing" if fn is None else f"is a {type(fn).__name__}, not a function")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        raise incompatible(where, "has no inspectable signature") from None
    names = list(params)
    shown = f"it now takes ({', '.join(names)})"
    by_position = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if names[: len(positional)] != list(positional) or any(params[n].kind not in by_position for n in positional):
        raise incompatible(where, f"changed its signature: expected it to start with ({', '.join(positional)}), {shown}")
    lost = [k for k in keyword if k not in params or params[k].kind == inspect.Parameter.POSITIONAL_ONLY]
    if lost:
        raise incompatible(where, f"no longer accepts {', '.join(lost)} by name: {shown}")


def code_names(fn: Any) -> set[str]:
    """Global and attribute names ``fn``'s code uses, nested comprehensions included."""
    found: set[str] = set()
    stack = [getattr(fn, "__code__", None)]
    while stack:
        code = stack.pop()
        if isinstance(code, types.CodeType):
            found.update(code.co_names)
            stack.extend(code.co_consts)
    return found


def _name(owner: Any) -> str:
    return getattr(owner, "__name__", type(owner).__name__)


# ------------------------------------------------------------------ refcounted attribute swaps

_MISSING = object()
_LOCK = threading.RLock()


@dataclass
class _Slot:
    owner: Any
    attr: str
    had: Any  # the owner's own value before the swap (``_MISSING``: inherited or absent)
    tag: Any  # identifies the replacement: a different one while held is a conflict
    count: int = 0


_SLOTS: dict[tuple[int, str], _Slot] = {}
_LIFETIME: set[tuple[int, str]] = set()

Target = tuple[Any, str]


def _acquire(targets: Iterable[Target], make: Callable[[Any], Any], tag: Any,
             check: Callable[[Any, str], None]) -> list[tuple[int, str]]:
    """Swap ``attr`` of each owner for ``make(original)`` (or join the holder already there).

    Every fresh target is checked before any is swapped, so a failed check swaps nothing.
    """
    unique = {(id(o), a): (o, a) for o, a in targets}
    with _LOCK:
        fresh = []
        for key, (owner, attr) in unique.items():
            slot = _SLOTS.get(key)
            if slot is None:
                original = getattr(owner, attr, None)
                check(original, f"{_name(owner)}.{attr}")
                fresh.append((key, owner, attr, original))
            elif slot.tag is not tag:
                raise PatchConflict(
                    f"{_name(owner)}.{attr} is already replaced by another OptiQ patch; "
                    "leave that one's `with` block before entering this one"
                )
        for key, owner, attr, original in fresh:
            had = vars(owner).get(attr, _MISSING)
            setattr(owner, attr, make(original))
            _SLOTS[key] = _Slot(owner, attr, had, tag)
        for key in unique:
            _SLOTS[key].count += 1
        return list(unique)


def _release(keys: Iterable[tuple[int, str]]) -> None:
    """Leave each swap; the last holder to leave puts the original back."""
    with _LOCK:
        for key in keys:
            slot = _SLOTS[key]
            slot.count -= 1
            if slot.count:
                continue
            del _SLOTS[key]
            if slot.had is not _MISSING:
                setattr(slot.owner, slot.attr, slot.had)
            elif slot.attr in vars(slot.owner):
                delattr(slot.owner, slot.attr)


@contextlib.contextmanager
def _swapped(targets: Iterable[Target], make: Callable[[Any], Any], tag: Any,
             check: Callable[[Any, str], None]) -> Iterator[int]:
    keys = _acquire(targets, make, tag, check)
    try:
        yield len(keys)
    finally:
        _release(keys)


def _hold(targets: Iterable[Target], make: Callable[[Any], Any], tag: Any,
          check: Callable[[Any, str], None]) -> int:
    """Like entering :func:`_swapped` once per target, kept until :func:`_drop`."""
    with _LOCK:
        targets = list(targets)
        new = [(o, a) for o, a in targets if (id(o), a) not in _LIFETIME]
        _LIFETIME.update(_acquire(new, make, tag, check))
        return len({(id(o), a) for o, a in targets})


def _drop(targets: Iterable[Target]) -> None:
    with _LOCK:
        keys = [k for k in {(id(o), a) for o, a in targets} if k in _LIFETIME]
        _LIFETIME.difference_update(keys)
        _release(keys)


def replaced(owner: Any, attr: str) -> bool:
    """Whether an OptiQ patch currently holds ``owner.attr``."""
    return (id(owner), attr) in _SLOTS


# ------------------------------------------------------------------ gated_delta_update


def _gated_delta() -> Any:
    try:
        from mlx_lm.models import gated_delta
    except ImportError:
        raise incompatible("mlx_lm.models.gated_delta", "is missing") from None
    return gated_delta


def check_gated_delta() -> None:
    """``gated_delta_update`` and the helpers the chunked recurrence calls (optiq.core.quant.gdn)."""
    mod = _gated_delta()
    for name, spec in (("gated_delta_update", GATED_DELTA_UPDATE), ("gated_delta_ops", GATED_DELTA_OPS),
                       ("compute_g", COMPUTE_G), ("compute_lower_bound_g", COMPUTE_LOWER_BOUND_G)):
        require_params(getattr(mod, name, None), f"mlx_lm.models.gated_delta.{name}", spec)


def _check_gdn_update(fn: Any, where: str) -> None:
    require_params(fn, where, GATED_DELTA_UPDATE)


def gated_delta_replaced(make: Callable[[Callable], Callable]) -> contextlib.AbstractContextManager[int]:
    """Within the block, every mlx-lm model module imported so far calls ``make(original)``
    instead of its ``gated_delta_update``; yields how many modules that is."""
    mods = [m for n, m in list(sys.modules.items())
            if n.startswith("mlx_lm.models.") and n != "mlx_lm.models.gated_delta"
            and m is not None and getattr(m, "gated_delta_update", None) is not None]
    if mods:  # no Gated DeltaNet model loaded: nothing to patch, nothing to check
        check_gated_delta()
    return _swapped([(m, "gated_delta_update") for m in mods], make, make, _check_gdn_update)


# ------------------------------------------------------------------ scaled_dot_product_attention


def stock_sdpa() -> Callable:
    """mlx-lm's shared ``scaled_dot_product_attention`` (checked)."""
    from mlx_lm.models import base

    fn = getattr(base, "scaled_dot_product_attention", None)
    require_params(fn, "mlx_lm.models.base.scaled_dot_product_attention", SDPA)
    return fn


def _check_sdpa(fn: Any, where: str) -> None:
    require_params(fn, where, SDPA)


def _sdpa_targets(modules: Iterable[Any]) -> list[Target]:
    return [(m, "scaled_dot_product_attention") for m in modules]


def sdpa_replaced(modules: Iterable[Any], replacement: Callable) -> contextlib.AbstractContextManager[int]:
    """Within the block, the given model modules call ``replacement`` as their SDPA."""
    return _swapped(_sdpa_targets(modules), lambda _: replacement, replacement, _check_sdpa)


def hold_sdpa(modules: Iterable[Any], replacement: Callable) -> int:
    """:func:`sdpa_replaced` held until :func:`release_sdpa` (idempotent); returns the module count."""
    return _hold(_sdpa_targets(modules), lambda _: replacement, replacement, _check_sdpa)


def release_sdpa(modules: Iterable[Any]) -> None:
    _drop(_sdpa_targets(modules))


# ------------------------------------------------------------------ mlx_lm.models.cache names


def check_prompt_cache_lookup() -> None:
    """Stock ``load_prompt_cache`` must still resolve class names in its module namespace."""
    from mlx_lm.models import cache

    fn = getattr(cache, "load_prompt_cache", None)
    if not inspect.isfunction(fn):
        raise incompatible("mlx_lm.models.cache.load_prompt_cache", "is missing")
    if "globals" not in code_names(fn):
        raise incompatible(
            "mlx_lm.models.cache.load_prompt_cache",
            "no longer looks cache classes up with globals(), so registering OptiQ's "
            "cache classes in that module no longer lets it load them",
        )


def _check_name_free(current: Any, where: str) -> None:
    if current is not None:
        raise incompatible(where, f"now exists in mlx-lm ({current!r}) and would shadow OptiQ's cache class")


def hold_cache_classes(classes: Iterable[type]) -> int:
    """Put ``classes`` into ``mlx_lm.models.cache`` under their names for good (stock
    ``load_prompt_cache`` then restores them); :func:`release_cache_classes` undoes it."""
    from mlx_lm.models import cache

    check_prompt_cache_lookup()
    return sum(
        _hold([(cache, c.__name__)], lambda _, c=c: c, c, _check_name_free) for c in classes
    )


def release_cache_classes(classes: Iterable[type]) -> None:
    from mlx_lm.models import cache

    _drop([(cache, c.__name__) for c in classes])


def base_cache_class() -> type:
    """mlx-lm's private ``_BaseCache`` (the cache protocol's defaults), checked."""
    from mlx_lm.models import cache

    base = getattr(cache, "_BaseCache", None)
    if not isinstance(base, type):
        raise incompatible("mlx_lm.models.cache._BaseCache", "is missing")
    lost = [m for m in BASE_CACHE_MEMBERS if not hasattr(base, m)]
    if lost:
        raise incompatible("mlx_lm.models.cache._BaseCache", f"lost {', '.join(lost)}")
    return base


# ------------------------------------------------------------------ model classes


def _get_classes() -> Callable:
    import mlx_lm.utils

    fn = getattr(mlx_lm.utils, "_get_classes", None)
    require_params(fn, "mlx_lm.utils._get_classes", GET_CLASSES)
    return fn


def model_classes(config: dict[str, Any]) -> tuple[type, type]:
    """``(Model, ModelArgs)`` mlx-lm implements ``config['model_type']`` with.

    Raises ``ValueError`` (as mlx-lm does) for a model type it does not implement.
    """
    return _get_classes()(config)


def _check_python_call(fn: Any, where: str) -> None:
    if not inspect.isfunction(fn):
        raise incompatible(where, "is not a Python function, so it cannot be wrapped")


def calls_wrapped(classes: Iterable[type], wrap: Callable[[Callable], Callable]) -> contextlib.AbstractContextManager[int]:
    """Within the block, instances of each class run ``wrap(original __call__)``."""
    return _swapped([(c, "__call__") for c in classes], wrap, wrap, _check_python_call)


def switch_linear_class() -> type:
    """mlx-lm's ``QuantizedSwitchLinear`` (OptiQ subclasses its ``__call__``)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    require_params(QuantizedSwitchLinear.__call__, "QuantizedSwitchLinear.__call__", SWITCH_LINEAR_CALL)
    return QuantizedSwitchLinear


def check_switch_linear() -> None:
    switch_linear_class()


# ------------------------------------------------------------------ BPE detokenizer state


def check_bpe_detokenizer() -> None:
    """The BPE detokenizer keeps ``text``/``offset`` as plain state and trims a leading
    space only while ``text`` is empty (what :func:`prime_bpe_detokenizer` relies on)."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer as bpe

    where = "mlx_lm.tokenizer_utils.BPEStreamingDetokenizer"
    trim = getattr(bpe, "_maybe_trim_space", None)
    if not inspect.isfunction(trim) or "text" not in code_names(trim):
        raise incompatible(f"{where}._maybe_trim_space", "is gone or no longer looks at self.text")
    if not {"text", "offset"} <= code_names(bpe.reset) or isinstance(getattr(bpe, "text", None), property):
        raise incompatible(f"{where}.reset", "no longer sets plain text/offset attributes")


def prime_bpe_detokenizer(detok: Any, placeholder: str) -> bool:
    """Start a BPE detokenizer's text with ``placeholder`` that ``last_segment`` skips.

    Returns False (and changes nothing) for any other detokenizer.
    """
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    if not isinstance(detok, BPEStreamingDetokenizer):
        return False
    check_bpe_detokenizer()
    detok.text = placeholder
    detok.offset = len(placeholder)
    return True


# ------------------------------------------------------------------ all checks

CHECKS: dict[str, Callable[[], None]] = {
    "gated_delta_update": check_gated_delta,
    "scaled_dot_product_attention": stock_sdpa,
    "load_prompt_cache class lookup": check_prompt_cache_lookup,
    "_BaseCache": base_cache_class,
    "_get_classes": _get_classes,
    "QuantizedSwitchLinear.__call__": check_switch_linear,
    "BPEStreamingDetokenizer state": check_bpe_detokenizer,
}


def run_checks() -> dict[str, str | None]:
    """Every seam check against the installed mlx-lm: name -> problem (None when it passes)."""
    out: dict[str, str | None] = {}
    for name, check in CHECKS.items():
        try:
            check()
            out[name] = None
        except MlxLmIncompatible as e:
            out[name] = str(e)
    return out


def check_all() -> list[str]:
    """Raise :class:`MlxLmIncompatible` listing every failed check; else the names checked."""
    results = run_checks()
    problems = [p for p in results.values() if p]
    if problems:
        raise MlxLmIncompatible("; ".join(problems) if len(problems) > 1 else problems[0])
    return list(results)


__all__ = [
    "CHECKS", "TESTED_WITH", "base_cache_class", "calls_wrapped", "check_all", "code_names", "gated_delta_replaced",
    "hold_cache_classes", "hold_sdpa", "incompatible", "mlx_lm_version", "model_classes",
    "prime_bpe_detokenizer", "release_cache_classes", "release_sdpa", "replaced", "require_params",
    "run_checks", "sdpa_replaced", "stock_sdpa", "switch_linear_class",
]
