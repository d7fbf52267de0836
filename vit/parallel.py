"""pmap plumbing: replicate state, shard host batches, prefetch, and start multi-host runs.

Arrays for `jax.pmap` carry a leading axis of one entry per local device, laid out with a
NamedSharding over a 1-D mesh of the local devices (the layout pmap itself produces).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vit.error_text import first_line

AXIS = "batch"

PyTree = Any
_ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class ParallelError(ValueError):
    """A batch or cluster setting that does not fit the devices at hand."""


def _sharding() -> jax.sharding.NamedSharding:
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree: PyTree) -> PyTree:
    """Copy every leaf onto all local devices, adding a leading axis of size local_device_count.

    Each device gets its own copy straight from the one host array (no n-fold host stack)."""
    devices, sharding = jax.local_devices(), _sharding()

    def put(x: Any) -> jax.Array:
        row = np.asarray(x)[None]
        return jax.make_array_from_single_device_arrays(
            (len(devices), *row.shape[1:]), sharding, [jax.device_put(row, d) for d in devices])

    return jax.tree_util.tree_map(put, tree)


def unreplicate(tree: PyTree) -> PyTree:
    """The first replica of every leaf, fetched to the host as numpy."""

    def first(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array):  # copy one device's row only, never gather the others
            return np.asarray(x.addressable_shards[0].data)[0]
        return np.asarray(x)[0]

    return jax.tree_util.tree_map(first, tree)


def shard(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Put host arrays shaped [local_devices, per_device, ...] onto the devices, one row each."""
    n = jax.local_device_count()
    for key, value in batch.items():
        if np.ndim(value) == 0 or np.shape(value)[0] != n:
            raise ParallelError(
                f"batch[{key!r}] has shape {np.shape(value)} but its leading axis must equal "
                f"the local device count {n}: reshape it to [{n}, per_device, ...]")
    sharding = _sharding()
    return {key: jax.device_put(value, sharding) for key, value in batch.items()}


def prefetch_to_device(iterator: Iterable[dict[str, np.ndarray]], size: int = 2) -> Iterator:
    """Yield `shard(batch)` for each batch, keeping `size` batches already on the devices."""
    queue: collections.deque = collections.deque()
    iterator = iter(iterator)

    def enqueue(count: int) -> None:
        for batch in itertools.islice(iterator, count):
            queue.append(shard(batch))

    enqueue(max(size, 1))
    while queue:
        yield queue.popleft()
        enqueue(1)


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join a multi-host run: explicit values, else JAX_* environment variables / auto-detection."""
    given = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ParallelError(
            f"initialize_distributed got coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}: pass all three or "
            "none (then JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID are used)")
    missing: list[str] = []
    if all(v is None for v in given):  # what the environment leaves out, JAX auto-detects
        missing = [name for name in _ENV_VARS if not os.environ.get(name)]
        coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
        num_processes, process_id = (_env_int(name) for name in _ENV_VARS[1:])
    host, colon, port = str(coordinator_address or "").rpartition(":")
    if coordinator_address is not None and not (colon and host and port.isdigit()):
        raise ParallelError(f"coordinator address {coordinator_address!r} is not host:port "
                            "(e.g. 10.0.0.1:1234): give the coordinator's host and a free port")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as err:
        unset = (f"; {', '.join(missing)} unset and not found by JAX's cluster detection (SLURM, "
                 f"Open MPI, TPU): set all of {', '.join(_ENV_VARS)}" if missing else "")
        raise ParallelError(
            f"jax.distributed.initialize failed ({first_line(err)}); check the coordinator address "
            f"{coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}{unset}") from None


def _env_int(name: str) -> int | None:
    """The integer in environment variable `name`; None if unset; ParallelError if not one."""
    text = os.environ.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ParallelError(f"{name}={text!r} is not an integer: set it to the number of "
                            "processes (JAX_NUM_PROCESSES) or this process's index "
                            "(JAX_PROCESS_ID)") from None


def per_device_batch(global_batch: int, name: str = "batch size") -> int:
    """The batch each device sees: global_batch / (process_count * local_device_count).

    `name` is how errors call the batch, e.g. "config.batch_size".
    """
    processes, local = jax.process_count(), jax.local_device_count()
    devices = processes * local
    if global_batch < 1:
        raise ParallelError(f"{name} must be >= 1, got {global_batch}")
    if global_batch % devices:
        raise ParallelError(
            f"{name} {global_batch} is not divisible by the {devices} devices "
            f"({processes} process(es) x {local} local): use a multiple of {devices}, "
            f"e.g. {max(devices, global_batch // devices * devices)}")
    return global_batch // devices


def sync_global_devices(name: str) -> None:
    """Barrier: wait until every process reaches this point (no-op on a single host)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def on_any_process(flag: bool) -> bool:
    """Whether `flag` is true on at least one process (every process gets the same answer)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def require_same_on_every_process(
    what: str, text: str,
    fix: str = "start every process with the same config file and --config flags",
) -> None:
    """ParallelError on every process, naming the first whose `text` (e.g. its run config)
    differs from process 0's, and `fix`; collectives would otherwise wait for each other
    forever."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))
    differ = [i for i, row in enumerate(every) if not np.array_equal(row, every[0])]
    if differ:
        raise ParallelError(f"process {differ[0]}'s {what} differs from process 0's: {fix}")
