"""Devices, meshes and multi-host start-up for data-parallel training.

One code path serves 1 CPU, 8 GPUs or a TPU pod: a 1-D `Mesh` over every device of every
process, named 'data'; parameters are replicated over it and batches are split along it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def _cluster_detected() -> bool:
    """True when the environment describes a multi-process job that JAX can configure itself.

    Mirrors the cluster types `jax.distributed.initialize()` auto-detects (SLURM, Open MPI,
    multi-host Cloud TPU) but only answers yes when there is more than one process, so a
    single-process run inside e.g. `srun -n 1` stays a plain local run.
    """
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return True
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return "," in hosts


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-process JAX job; a no-op for a single process. Returns True if joined.

    Arguments left as None are read from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID`; failing those, on SLURM, Open MPI or a multi-host TPU, JAX detects them.
    Must run before anything touches a device. Calling it twice is harmless.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    explicit = coordinator_address is not None or num_processes is not None
    if num_processes == 1 or not (explicit or _cluster_detected()):
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    return True


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, datasets)."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split evenly over the mesh's 'data' axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def mesh_size(mesh: Mesh) -> int:
    """Number of devices in the mesh (over all processes)."""
    return int(mesh.devices.size)
