"""A terminal progress bar for training: loss, tokens/s and peak memory as it goes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .trainer import EvalReport, StepReport


class ProgressBar:
    """tqdm bar fed by the trainer's reporter calls; messages go above the bar."""

    def __init__(self, echo: Callable[[str], None] | None = None, disable: bool = False):
        self._bar = None
        self._disable = disable
        self._echo = echo

    def _write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg)
        elif self._echo:
            self._echo(msg)
        else:
            print(msg)

    def on_start(self, start_step: int, iters: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=iters, initial=start_step, desc="train", unit="step",
                         disable=self._disable, dynamic_ncols=True)
        if start_step:
            self._write(f"resumed at step {start_step}")

    def on_step(self, step: int, loss: float, tokens_per_second: float, peak_memory: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"loss {loss:.3f} | {tokens_per_second:,.0f} tok/s | peak {peak_memory / 1e9:.2f} GB",
                refresh=False,
            )
            self._bar.update(1)

    def on_report(self, r: StepReport) -> None:
        self._write(
            f"step {r.step}: train loss {r.loss:.4f}, {r.tokens_per_second:,.0f} tok/s, "
            f"{r.trained_tokens:,} tokens, peak memory {r.peak_memory / 1e9:.3f} GB"
        )

    def on_eval(self, r: EvalReport) -> None:
        mark = " (best)" if r.best else ""
        self._write(f"step {r.step}: validation loss {r.val_loss:.4f}{mark} [{r.seconds:.1f}s]")

    def on_save(self, step: int, path: Path) -> None:
        self._write(f"step {step}: checkpoint {path}")

    def on_end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
