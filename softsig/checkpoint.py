"""orbax-checkpoint: async saves of the latest steps and, separately, the best one.

Two managers: ``checkpoints/latest`` keeps the newest few steps, ``checkpoints/best``
keeps the step with the best test accuracy. Keeping them apart means the best policy
can never evict the newest checkpoint (orbax#526), which resuming needs.

orbax's ``latest_step()`` still reports a damaged finished step (truncated or missing
files), so ``restore_latest`` walks the steps newest-first and falls back, with a
warning, to the newest one that restores. A kill during an async save leaves only an
``*.orbax-checkpoint-tmp`` directory, which orbax ignores.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


def has_checkpoint(directory: str) -> bool:
    """Whether ``directory`` (a Checkpointer's) holds at least one finished latest step."""
    latest = os.path.join(directory, "latest")
    return os.path.isdir(latest) and any(name.isdigit() for name in os.listdir(latest))


class Checkpointer:
    """Saves and restores ``(state, meta)``: a host pytree of arrays and a JSON dict."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = directory
        options = dict(create=True, enable_async_checkpointing=True, cleanup_tmp_directories=True)
        self._latest = ocp.CheckpointManager(
            os.path.join(directory, "latest"), options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options)
        )
        self._best = ocp.CheckpointManager(
            os.path.join(directory, "best"), options=ocp.CheckpointManagerOptions(max_to_keep=1, **options)
        )
        self._best_accuracy = self._read_best_accuracy()
        # Steps on disk at start-up. Decisions below use this set, never a fresh directory listing:
        # in a multi-host job a listing can differ between processes mid-save, and a process that
        # takes a different branch waits forever in orbax's cross-process barrier.
        self._existing = {id(self._latest): set(self._latest.all_steps()), id(self._best): set(self._best.all_steps())}

    def _read_best_accuracy(self) -> float:
        step = self._best.latest_step()
        if step is None:
            return -1.0
        try:
            meta = self._best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            return float(meta.get("test_accuracy", -1.0))
        except Exception:  # a damaged best checkpoint: the next good one replaces it
            return -1.0

    def save(self, step: int, state: Any, meta: dict, *, test_accuracy: float | None = None) -> None:
        """Starts an async save of ``state`` (host arrays) at ``step``; also as best if it improves.

        A step that already exists is one that failed to restore (a good one would have been
        resumed from), so it is replaced.
        """
        state = jax.tree.map(np.asarray, state)  # numpy scalars (np.int32) are not storable, 0-d arrays are
        if test_accuracy is not None:
            meta = {**meta, "test_accuracy": test_accuracy}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._replace(self._latest, step, args)
        if test_accuracy is not None and test_accuracy > self._best_accuracy:
            self._best_accuracy = test_accuracy
            # One manager's async save at a time: two concurrent saves of the same step by two
            # managers deadlocked orbax's multi-process barriers (seen with 2 processes).
            self._latest.wait_until_finished()
            self._replace(self._best, step, args)

    def _replace(self, manager: ocp.CheckpointManager, step: int, args) -> None:
        existing = self._existing[id(manager)]
        if step in existing:  # left by a run that could not restore it (damaged)
            manager.wait_until_finished()
            manager.delete(step)
            existing.discard(step)
        manager.save(step, args=args)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """``(step, state, meta)`` of the newest checkpoint that restores, or None if there is none."""
        abstract_state = jax.tree.map(np.asarray, abstract_state)
        for step in sorted(self._latest.all_steps(), reverse=True):
            try:
                restored = self._latest.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
                )
                state = jax.tree.map(np.asarray, restored["state"])
                return step, state, dict(restored["meta"])
            except Exception as error:  # orbax raises several types for damaged steps
                logging.warning(
                    "Checkpoint step %d in %s is damaged (%s: %s); falling back to an older step.",
                    step, self._latest.directory, type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "",
                )
        return None

    def latest_steps(self) -> list[int]:
        return list(self._latest.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True in a multi-host job once the cluster announced preemption (all hosts agree)."""
        return jax.process_count() > 1 and self._latest.reached_preemption(step)

    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._latest.close()
        self._best.close()
