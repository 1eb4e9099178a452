"""What a run reports: metrics.jsonl, TensorBoard scalars, a progress line, the NaN guard.

Only process 0 writes files; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf."""


def check_finite(losses: Any, first_step: int, seed: int | None = None) -> None:
    """Raises ``NonFiniteLossError`` naming the first step (and seed) whose loss is not finite."""
    for offset, value in enumerate(losses):
        if not math.isfinite(float(value)):
            where = f"step {first_step + offset + 1}" + ("" if seed is None else f" (seed {seed})")
            raise NonFiniteLossError(
                f"training loss is {float(value)} at {where}; stopping. "
                "Checkpoints written before it are untouched (try a lower --learning_rate)."
            )


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._workdir = workdir
        self._tensorboard = None

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step`` (written after the checkpoint a resumed run restarts from)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):  # a line cut short by a kill
                continue
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
        writer = self._tensorboard_writer()
        if writer is not None:
            for name, value in record.items():
                if name not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(name, value, record["step"])
            writer.flush()

    def _tensorboard_writer(self):
        if self._tensorboard is None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # TensorBoard files are a convenience, metrics.jsonl is the record
                self._tensorboard = False
                return None
            self._tensorboard = SummaryWriter(os.path.join(self._workdir, "tensorboard"))
        return self._tensorboard or None

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """An updating status line on a terminal; a plain log line every ``log_every_s`` otherwise."""

    def __init__(self, total_steps: int, *, enabled: bool = True, log_every_s: float = 30.0, stream=None):
        self.total_steps = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every_s = log_every_s
        self._start_time = time.monotonic()
        self._start_step: int | None = None
        self._last_log = -math.inf

    def update(self, step: int, epoch: int, loss: float, images_per_second: float) -> None:
        if not self.enabled:
            return
        if self._start_step is None:
            self._start_step, self._start_time = step, time.monotonic()
        elapsed = time.monotonic() - self._start_time
        done = step - self._start_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        text = (
            f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.0f}%) epoch {epoch} "
            f"loss {loss:.4f} {images_per_second:,.0f} img/s ETA {_duration(eta)}"
        )
        now = time.monotonic()
        if self.interactive:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
        elif now - self._last_log >= self.log_every_s or step == self.total_steps:
            self._last_log = now
            self._plain_line(text)

    def message(self, text: str) -> None:
        """A line that stays (evaluation results), printed above the status line."""
        if not self.enabled:
            return
        if self.interactive:
            self.stream.write("\r\x1b[K" + text + "\n")
            self.stream.flush()
        else:
            self._plain_line(text)

    def _plain_line(self, text: str) -> None:
        """A timestamped line for cluster logs (no carriage returns)."""
        self.stream.write(time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
