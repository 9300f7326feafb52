"""Meshes, shardings and the single-process no-op of `initialize_distributed`."""

import jax
import numpy as np

from cnn_jax import parallel


def test_mesh_and_shardings_over_all_devices():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and parallel.mesh_size(mesh) == jax.device_count()
    x = jax.device_put(np.arange(jax.device_count() * 2.0), parallel.data_sharded(mesh))
    assert len({s.device for s in x.addressable_shards}) == jax.device_count()
    assert x.addressable_shards[0].data.shape == (2,)
    y = jax.device_put(np.arange(3.0), parallel.replicated(mesh))
    assert all(s.data.shape == (3,) for s in y.addressable_shards)


def test_mesh_over_chosen_devices():
    mesh = parallel.make_mesh(jax.devices()[:1])
    assert parallel.mesh_size(mesh) == 1


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for var in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "SLURM_NTASKS",
        "SLURM_JOB_ID",
        "OMPI_MCA_orte_hnp_uri",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
    ):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed(num_processes=1) is False
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # `srun -n 1`: still a plain local run
    assert parallel.initialize_distributed() is False
    assert jax.process_count() == 1
