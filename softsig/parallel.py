"""Data parallelism: one per-device function, three ways to run it.

``none``       ``jax.jit`` on one device (the reference every other mode must match);
``pmap``       ``jax.pmap`` with collectives over the named axis ``"data"``;
``shard_map``  ``jax.jit(jax.shard_map(...))`` on a 1-D ``Mesh`` with axis ``"data"``.

The per-device function takes ``axis_name=`` (``None`` or ``"data"``) and does its own
``pmean``/``psum`` (see ``train.train_step_body``). Arguments and results are of three
kinds: ``REPLICATED`` (a full copy per device: state, device-resident datasets),
``SHARDED`` (split along the leading axis over devices: a global batch) and
``BROADCAST`` (small host values such as the epoch number).

Where arrays live: under ``shard_map`` a replicated value is one global ``jax.Array``
with sharding ``P()``; under ``pmap`` it is stacked along a leading device axis (what
``pmap`` expects) and sharded over it, so no call ever re-transfers it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MODES = ("none", "pmap", "shard_map")
AXIS = "data"
REPLICATED, SHARDED, BROADCAST = "replicated", "sharded", "broadcast"


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """How a per-device function is mapped over the devices, and how its data is placed."""

    mode: str
    devices: tuple[jax.Device, ...]

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Unknown parallel mode {self.mode!r}; valid modes: {', '.join(MODES)}.")
        if self.mode == "none" and len(self.devices) != 1:
            raise ValueError(f"parallel mode 'none' runs on one device, got {len(self.devices)}.")

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def axis_name(self) -> str | None:
        return None if self.mode == "none" else AXIS

    @functools.cached_property
    def mesh(self) -> Mesh:
        return Mesh(np.asarray(self.devices), (AXIS,))

    def check_batch_size(self, global_batch_size: int, what: str = "batch_size") -> int:
        """Per-device batch size; a clear error when the global size does not split evenly."""
        if global_batch_size <= 0 or global_batch_size % self.num_devices:
            raise ValueError(
                f"{what}={global_batch_size} must be a positive multiple of the number of devices "
                f"({self.num_devices}); try {max(1, global_batch_size // self.num_devices) * self.num_devices}."
            )
        return global_batch_size // self.num_devices

    # -- placement ------------------------------------------------------------------------

    def put(self, tree: Any, kind: str) -> Any:
        """Host arrays (the full global value on every process) -> device arrays of ``kind``."""
        return jax.tree.map(functools.partial(self._put_leaf, kind=kind), tree)

    def _put_leaf(self, value, kind):
        value = np.asarray(value)
        if self.mode == "none":
            return jax.device_put(value, self.devices[0])
        if kind == BROADCAST:
            return value
        if kind == SHARDED:
            self.check_batch_size(value.shape[0], "leading dimension")
            if self.mode == "pmap":
                value = value.reshape(self.num_devices, -1, *value.shape[1:])
            return _from_host(value, NamedSharding(self.mesh, P(AXIS)))
        if kind == REPLICATED:
            if self.mode == "pmap":
                stacked = np.broadcast_to(value[None], (self.num_devices, *value.shape))
                return _from_host(stacked, NamedSharding(self.mesh, P(AXIS)))
            return _from_host(value, NamedSharding(self.mesh, P()))
        raise ValueError(f"unknown placement kind {kind!r}")

    def get(self, tree: Any, kind: str) -> Any:
        """Device arrays of ``kind`` -> host numpy (one copy of a replicated value; the global batch)."""
        return jax.tree.map(functools.partial(self._get_leaf, kind=kind), tree)

    def _get_leaf(self, value, kind):
        if self.mode == "none" or kind == BROADCAST:
            return np.asarray(value)
        if kind == REPLICATED:
            local = np.asarray(value.addressable_data(0))
            return np.asarray(local[0]) if self.mode == "pmap" else local
        if kind == SHARDED:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                value = multihost_utils.process_allgather(value, tiled=True)
            value = np.asarray(value)
            return value.reshape(-1, *value.shape[2:]) if self.mode == "pmap" else value
        raise ValueError(f"unknown placement kind {kind!r}")

    # -- mapping --------------------------------------------------------------------------

    def compile(
        self,
        per_device_fn: Callable[..., Any],
        in_kinds: Sequence[str],
        out_kinds: Any,
        donate_argnums: Sequence[int] = (),
    ) -> Callable[..., Any]:
        """``per_device_fn(*args, axis_name=...)`` mapped over the devices and compiled.

        ``in_kinds`` has one kind per positional argument; ``out_kinds`` is a pytree prefix
        of the result (e.g. ``(REPLICATED, REPLICATED)`` for ``(state, metrics)``).
        """
        fn = functools.partial(per_device_fn, axis_name=self.axis_name)
        donate_argnums = tuple(donate_argnums)
        if self.mode == "none":
            return jax.jit(fn, donate_argnums=donate_argnums)
        if self.mode == "pmap":
            in_axes = tuple(None if kind == BROADCAST else 0 for kind in in_kinds)
            return jax.pmap(
                fn, axis_name=AXIS, in_axes=in_axes, out_axes=0, devices=self.devices, donate_argnums=donate_argnums
            )
        in_specs = tuple(P(AXIS) if kind == SHARDED else P() for kind in in_kinds)
        out_specs = jax.tree.map(lambda kind: P(AXIS) if kind == SHARDED else P(), out_kinds)
        # check_vma=False: collectives are written by hand in the body, exactly as under pmap
        # (with VMA checking on, grads of replicated params would come back already psum-ed).
        mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        return jax.jit(mapped, donate_argnums=donate_argnums)


def _from_host(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value every process holds in full (multi-host safe)."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def make_parallel(mode: str, num_devices: int | None = None) -> DataParallel:
    """``DataParallel`` over the first ``num_devices`` global devices (all by default; 1 for ``none``)."""
    if mode not in MODES:
        raise ValueError(f"Unknown parallel mode {mode!r}; valid modes: {', '.join(MODES)}.")
    devices = jax.devices()
    if mode == "none":
        if jax.process_count() > 1:
            raise ValueError("parallel mode 'none' is single-process; use shard_map or pmap for multi-host jobs.")
        num_devices = 1
    num_devices = len(devices) if num_devices is None else num_devices
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available.")
    if jax.process_count() > 1 and num_devices != len(devices):
        raise ValueError("multi-host jobs must use every device of every process.")
    return DataParallel(mode=mode, devices=tuple(devices[:num_devices]))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` with explicit settings, or the cluster's auto-detection.

    Call before any other JAX work. With no arguments, JAX detects SLURM, Open MPI,
    Kubernetes/GKE TPU and similar environments itself.
    """
    if coordinator_address is None and num_processes is None and process_id is None:
        jax.distributed.initialize()
        return
    if None in (coordinator_address, num_processes, process_id):
        raise ValueError("coordinator_address, num_processes and process_id must be given together.")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
