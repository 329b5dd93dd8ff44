"""The LoRA training loop: compiled steps, validation, checkpoints, resume, best adapter.

Checkpoints hold the adapter, the optimizer state and the step; the data order and the
dropout masks are pure functions of (seed, step) (:func:`optiq.train.data.train_batch_at`),
so a run resumed from a checkpoint continues exactly as if it had not stopped. A
checkpoint is written to a temporary folder and renamed, so an interruption never leaves
a half-written one; Ctrl-C saves one before stopping.

Output directory::

    adapter_config.json         (written by the caller before training)
    adapters.safetensors        latest weights (final ones after the last step)
    best_adapters.safetensors   weights with the lowest validation loss so far
    checkpoints/step_0000100/   adapters + optimizer + state.json, the last few kept
    trainer_state.json          history of losses, tokens/s, peak memory, best step
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from optiq.core.errors import ConfigError, OptiQError
from optiq.core.head import (
    OutputHead,
    chunked_cross_entropy,
    cross_entropy_no_grad,
    find_head,
    head_input,
    is_plain_head,
)
from optiq.core.mlx_lm_seam import calls_wrapped

from .adapters import ADAPTER_WEIGHTS, adapter_weights, save_weights
from .data import Batch, Dataset, batch_groups, make_batch, train_batch_at

BEST_WEIGHTS = "best_adapters.safetensors"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"


@dataclass
class TrainArgs:
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    max_seq_length: int = 2048
    val_batches: int = 25  # -1: the whole validation set
    steps_per_eval: int = 200
    steps_per_report: int = 10
    save_every: int = 100
    grad_checkpoint: bool = False
    seed: int = 0
    keep_checkpoints: int = 3
    compile: bool = False  # mx.compile the step: compiling Gated DeltaNet graphs is slow on CPU
    fast_gdn: bool = True  # chunked Gated DeltaNet recurrence (optiq.core.quant.gdn) on CPU

    def check(self) -> None:
        for name in ("iters", "batch_size", "steps_per_eval", "steps_per_report", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.val_batches == 0 or self.val_batches < -1:
            raise ConfigError("--val-batches must be -1 (all) or a positive number")
        if self.learning_rate <= 0:
            raise ConfigError("--learning-rate must be positive")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep at least one checkpoint")


@dataclass
class StepReport:
    step: int
    loss: float  # mean training loss over the steps since the last report
    tokens_per_second: float  # trained (loss) tokens per second of training time
    trained_tokens: int  # cumulative
    peak_memory: int  # bytes, mx.get_peak_memory()
    learning_rate: float


@dataclass
class EvalReport:
    step: int
    val_loss: float
    best: bool
    seconds: float


class Reporter(Protocol):
    def on_start(self, start_step: int, iters: int) -> None: ...
    def on_step(self, step: int, loss: float, tokens_per_second: float, peak_memory: int) -> None: ...
    def on_report(self, report: StepReport) -> None: ...
    def on_eval(self, report: EvalReport) -> None: ...
    def on_save(self, step: int, path: Path) -> None: ...
    def on_end(self) -> None: ...


class NullReporter:
    def on_start(self, start_step, iters): pass
    def on_step(self, step, loss, tokens_per_second, peak_memory): pass
    def on_report(self, report): pass
    def on_eval(self, report): pass
    def on_save(self, step, path): pass
    def on_end(self): pass


@dataclass
class TrainResult:
    steps: int
    final_train_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    val_losses: list[tuple[int, float]]
    tokens_per_second: float  # over the whole run (training time only)
    peak_memory: int
    output_dir: Path
    resumed_from: int = 0


@dataclass
class _State:
    step: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    trained_tokens: int = 0
    input_tokens: int = 0
    train_seconds: float = 0.0
    train_losses: list = field(default_factory=list)  # (step, loss)
    val_losses: list = field(default_factory=list)  # (step, loss)
    peak_memory: int = 0


class TrainingInterrupted(OptiQError):
    """Training stopped by the user; a checkpoint was saved."""


# ---------------------------------------------------------------------------- loss


def step_seed(seed: int, step: int) -> int:
    """Random seed of one training step, so a resumed run draws the same dropout masks."""
    return (seed * 1_000_003 + step) % (2**63)


def loss_fn(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array,
            head: OutputHead | None = None, grad: bool = True):
    """Mean cross-entropy over the masked (trained) target tokens.

    With ``head`` (the model's output head, see :func:`training_head`) the loss is
    computed chunk by chunk over the vocabulary from the head's input
    (:func:`optiq.core.head.chunked_cross_entropy`): no vocabulary-sized logits or
    dequantized head weight; ``grad=False`` skips the gradient's half of that pass.
    """
    ntoks = mask.sum()
    if head is None:
        logits = model(inputs).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, targets)
    else:
        h = head_input(model, head, inputs)
        h, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        ce = (chunked_cross_entropy(h, head, t) if grad else cross_entropy_no_grad(h, head, t))
        ce = ce.reshape(targets.shape)
    return (ce * mask).sum() / ntoks, ntoks


def training_head(model: nn.Module, tokens: mx.array) -> OutputHead | None:
    """The output head for the chunked loss, or None when the model has no single head or
    transforms its logits after it (soft-capping...): then full logits are computed."""
    head = find_head(model)
    if head is None:
        return None
    was_training = model.training
    model.eval()  # no dropout: the check compares two forward passes
    try:
        return head if is_plain_head(model, head, tokens[:1, :4]) else None
    finally:
        if was_training:
            model.train()


def _arrays(batch: Batch) -> tuple[mx.array, mx.array, mx.array]:
    return mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask)


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, max_seq_length: int,
             num_batches: int = -1, head: OutputHead | None = None) -> float:
    """Token-weighted mean loss over the first ``num_batches`` batches (fixed order)."""
    was_training = model.training
    model.eval()
    groups = batch_groups(dataset.records, batch_size)
    if num_batches != -1:
        groups = groups[:num_batches]
    total, count = mx.array(0.0), mx.array(0.0)
    for g in groups:
        batch = make_batch([dataset.records[i] for i in g], max_seq_length)
        loss, n = loss_fn(model, *_arrays(batch), head=head, grad=False)
        total = total + loss * n
        count = count + n
        mx.eval(total, count)
    if was_training:
        model.train()
    return (total / count).item()


# ---------------------------------------------------------------------------- grad checkpointing


def _checkpointed(fn: Callable) -> Callable:
    """``fn`` (a block's ``__call__``) recomputed in the backward pass instead of stored."""

    def checkpointed(module, *args, **kwargs):
        def inner(params, *args, **kwargs):
            module.update(params)
            return fn(module, *args, **kwargs)

        return mx.checkpoint(inner)(module.trainable_parameters(), *args, **kwargs)

    return checkpointed


def grad_checkpointing(blocks: list[nn.Module]) -> contextlib.AbstractContextManager[int]:
    """Recompute each decoder block's activations in the backward pass (less memory).

    mlx-lm patches the block class for good; this restores it afterwards (through
    :func:`optiq.core.mlx_lm_seam.calls_wrapped`, which also nests).
    """
    return calls_wrapped({type(b) for b in blocks}, _checkpointed)


def fast_gdn_context() -> contextlib.AbstractContextManager:
    """Chunked Gated DeltaNet recurrence on CPU (same results, ~2x faster training and
    about half the activation memory than mlx-lm's token-by-token loop)."""
    from optiq.core.quant.gdn import fast_gated_delta

    return fast_gated_delta()


def training_context(args: TrainArgs, blocks: list[nn.Module] | None) -> contextlib.ExitStack:
    """What a training step runs inside: grad checkpointing (if asked), fast Gated DeltaNet."""
    ctx = contextlib.ExitStack()
    if args.grad_checkpoint and blocks:
        ctx.enter_context(grad_checkpointing(blocks))
    if args.fast_gdn:
        ctx.enter_context(fast_gdn_context())
    return ctx


def make_step(model: nn.Module, optimizer: optim.Optimizer, head: OutputHead | None,
              compile: bool = False) -> tuple[Callable, list]:
    """``step(inputs, targets, mask) -> (loss, ntoks)``: one update of the trainable
    parameters; and the state to ``mx.eval`` after it."""
    loss_value_and_grad = nn.value_and_grad(model, partial(loss_fn, head=head))
    captured = [model.state, optimizer.state, mx.random.state]

    def step(inputs, targets, mask):
        (loss, ntoks), grads = loss_value_and_grad(model, inputs, targets, mask)
        optimizer.update(model, grads)
        return loss, ntoks

    return (partial(mx.compile, inputs=captured, outputs=captured)(step) if compile else step), captured


# ---------------------------------------------------------------------------- checkpoints


def _ckpt_dir(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINTS / f"step_{step:07d}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step_") and (d / "state.json").exists():
            try:
                found.append((int(d.name[5:]), d))
            except ValueError:
                continue
    return sorted(found)


def _save_checkpoint(out_dir: Path, model: nn.Module, optimizer: optim.Optimizer,
                     state: _State, keep: int) -> Path:
    final = _ckpt_dir(out_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), adapter_weights(model), metadata={"format": "mlx"})
    opt = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt)
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _set_path(tree: Any, path: str, value: mx.array) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value


def _load_checkpoint(ckpt: Path, model: nn.Module, optimizer: optim.Optimizer) -> _State:
    weights = mx.load(str(ckpt / ADAPTER_WEIGHTS))
    current = adapter_weights(model)
    if set(weights) != set(current) or any(weights[k].shape != current[k].shape for k in current):
        raise ConfigError(
            f"checkpoint {ckpt} does not match the adapter being trained (other targets or "
            "ranks): resume with the same options, or train into a new directory"
        )
    model.load_weights(list(weights.items()), strict=False)
    opt = mx.load(str(ckpt / "optimizer.safetensors"))
    optimizer.init(model.trainable_parameters())
    flat = dict(tree_flatten(optimizer.state))
    if set(opt) != set(flat):
        raise ConfigError(f"checkpoint {ckpt}: optimizer state does not match this run")
    for k, v in opt.items():
        _set_path(optimizer.state, k, v)
    raw = json.loads((ckpt / "state.json").read_text())
    state = _State(**{k: v for k, v in raw.items() if k in _State.__dataclass_fields__})
    state.train_losses = [tuple(x) for x in state.train_losses]
    state.val_losses = [tuple(x) for x in state.val_losses]
    mx.eval(model.parameters(), optimizer.state)
    return state


# ---------------------------------------------------------------------------- training


def _write_state(out_dir: Path, state: _State, args: TrainArgs, extra: dict[str, Any]) -> None:
    tps = state.trained_tokens / state.train_seconds if state.train_seconds else 0.0
    data = {
        **asdict(state),
        "tokens_per_second": tps,
        "input_tokens_per_second": state.input_tokens / state.train_seconds if state.train_seconds else 0.0,
        "peak_memory_gb": state.peak_memory / 1e9,
        "args": asdict(args),
        **extra,
    }
    (out_dir / STATE_FILE).write_text(json.dumps(data, indent=1) + "\n")


def train(
    model: nn.Module,
    train_set: Dataset,
    valid_set: Dataset | None,
    args: TrainArgs,
    out_dir: Path,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    blocks: list[nn.Module] | None = None,
    head: OutputHead | None = None,
) -> TrainResult:
    """Train the LoRA parameters of an already wrapped ``model`` (see adapters.apply_plan);
    ``head``: compute the loss chunked over the vocabulary (see :func:`loss_fn`)."""
    args.check()
    reporter = reporter or NullReporter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(train_set) < args.batch_size:
        raise ConfigError(
            f"{train_set.path} has {len(train_set)} usable records, fewer than --batch-size "
            f"{args.batch_size}: lower the batch size or add data"
        )
    groups = batch_groups(train_set.records, args.batch_size)
    optimizer = optim.Adam(learning_rate=args.learning_rate)
    mx.random.seed(args.seed)

    state = _State()
    resumed_from = 0
    if resume:
        ckpts = list_checkpoints(out_dir)
        if not ckpts:
            raise ConfigError(f"--resume: {out_dir} has no checkpoint to resume from")
        state = _load_checkpoint(ckpts[-1][1], model, optimizer)
        resumed_from = state.step
        if state.step >= args.iters:
            raise ConfigError(
                f"{out_dir} is already trained to step {state.step}; raise --iters above it "
                "to train further"
            )
    else:
        optimizer.init(model.trainable_parameters())

    step_fn, captured = make_step(model, optimizer, head, args.compile)
    extra = {"train_records": len(train_set), "valid_records": len(valid_set) if valid_set else 0}

    def validate(step: int) -> None:
        if valid_set is None:
            return
        tic = time.perf_counter()
        val = evaluate(model, valid_set, args.batch_size, args.max_seq_length, args.val_batches, head)
        best = state.best_val_loss is None or val < state.best_val_loss
        state.val_losses.append((step, val))
        if best:
            state.best_val_loss, state.best_step = val, step
            save_weights(model, out_dir / BEST_WEIGHTS)
        reporter.on_eval(EvalReport(step, val, best, time.perf_counter() - tic))

    def checkpoint() -> Path:
        save_weights(model, out_dir / ADAPTER_WEIGHTS)
        path = _save_checkpoint(out_dir, model, optimizer, state, args.keep_checkpoints)
        _write_state(out_dir, state, args, extra)
        return path

    mx.reset_peak_memory()
    model.train()
    ctx = training_context(args, blocks)
    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
    saved_step = state.step
    pending = state.step  # last step whose update was issued
    reporter.on_start(state.step, args.iters)
    try:
        with ctx:
            if state.step == 0:
                validate(0)
            for step in range(state.step + 1, args.iters + 1):
                idx = train_batch_at(step, groups, args.seed)
                batch = make_batch([train_set.records[i] for i in idx], args.max_seq_length)
                mx.random.seed(step_seed(args.seed, step))  # dropout masks: f(seed, step)
                tic = time.perf_counter()
                loss, ntoks = step_fn(*_arrays(batch))
                pending = step
                mx.eval(captured, loss, ntoks)
                dt = time.perf_counter() - tic
                loss_v, n = loss.item(), int(ntoks.item())
                state.step = step
                state.trained_tokens += n
                state.input_tokens += batch.tokens
                state.train_seconds += dt
                state.peak_memory = max(state.peak_memory, mx.get_peak_memory())
                window_loss += loss_v
                window_steps += 1
                window_tokens += n
                window_time += dt
                reporter.on_step(step, loss_v, window_tokens / window_time, state.peak_memory)
                if step % args.steps_per_report == 0 or step == args.iters:
                    mean = window_loss / window_steps
                    state.train_losses.append((step, mean))
                    reporter.on_report(
                        StepReport(step, mean, window_tokens / window_time, state.trained_tokens,
                                   state.peak_memory, args.learning_rate)
                    )
                    window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
                if step % args.steps_per_eval == 0 or step == args.iters:
                    validate(step)
                if step % args.save_every == 0 or step == args.iters:
                    reporter.on_save(step, checkpoint())
                    saved_step = step
    except KeyboardInterrupt:
        if pending > state.step:  # stopped between issuing an update and recording it
            mx.eval(captured)
            state.step = pending
        if state.step > saved_step:
            reporter.on_save(state.step, checkpoint())
        reporter.on_end()
        raise TrainingInterrupted(
            f"training interrupted at step {state.step}; checkpoint saved in {out_dir}: "
            "continue with --resume"
        ) from None
    reporter.on_end()
    if valid_set is None:  # no validation: the best adapter is the last one
        shutil.copy2(out_dir / ADAPTER_WEIGHTS, out_dir / BEST_WEIGHTS)
    _write_state(out_dir, state, args, extra)
    return TrainResult(
        steps=state.step,
        final_train_loss=state.train_losses[-1][1] if state.train_losses else None,
        best_val_loss=state.best_val_loss,
        best_step=state.best_step,
        val_losses=list(state.val_losses),
        tokens_per_second=state.trained_tokens / state.train_seconds if state.train_seconds else 0.0,
        peak_memory=state.peak_memory,
        output_dir=out_dir,
        resumed_from=resumed_from,
    )

