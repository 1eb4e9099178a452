"""What a run reports: metrics.jsonl, TensorBoard scalars, a progress line, the NaN guard.

Only process 0 writes files; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
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


def is_scalar_metric(name: str, value: Any) -> bool:
    """A record field that is one number per run (not ``step``/``epoch``, not a flag or a list)."""
    return name not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._workdir = workdir
        self._tensorboard: EventFileWriter | None = None

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
        scalars = {name: float(value) for name, value in record.items() if is_scalar_metric(name, value)}
        if scalars:
            if self._tensorboard is None:
                self._tensorboard = EventFileWriter(os.path.join(self._workdir, "tensorboard"))
            self._tensorboard.add_scalars(record["step"], scalars)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


class EventFileWriter:
    """Scalars as a TensorBoard event file, written directly (no TensorFlow, no tensorboardX).

    The format is TFRecord framing around serialized ``tensorflow.Event`` protos:
    ``Event{wall_time=1, step=2, file_version=3, summary=5}``,
    ``Summary{value=1}``, ``Summary.Value{tag=1, simple_value=2}``. Writing it here saves
    a dependency and 0.2-1.5 s of imports per run (tensorboardX imports torch when present).
    """

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(directory, name)
        self._file = open(self.path, "ab")
        self._write_event(_encode_event(time.time(), 0, file_version="brain.Event:2"))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """One event at ``step`` holding every ``tag: value`` (float32, as TensorBoard stores them)."""
        self._write_event(_encode_event(time.time(), step, scalars=scalars))
        self._file.flush()

    def _write_event(self, event: bytes) -> None:
        length = struct.pack("<Q", len(event))
        self._file.write(length + struct.pack("<I", _masked_crc32c(length)) + event + struct.pack("<I", _masked_crc32c(event)))

    def close(self) -> None:
        self._file.close()


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 as protobuf encodes it
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                  scalars: dict[str, float] | None = None) -> bytes:
    event = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        event += _length_delimited(3, file_version.encode())
    if scalars:
        values = (
            _length_delimited(1, _length_delimited(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        event += _length_delimited(5, b"".join(values))
    return event


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


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
