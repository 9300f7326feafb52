"""Multi-host data parallelism on one machine: 2 processes x 2 CPU devices (gloo collectives)
give the same final parameters as 1 process x 4 devices."""

import json
import socket
import subprocess

import numpy as np
import pytest
from train_helpers import config_arg, flatten, run_script, tiny_config

from cnn_jax.train import load_npz

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

CONFIG = config_arg(tiny_config("train.num_epochs=1", "checkpoint.async_save=False"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    single = run_script(
        ["--config", CONFIG, "--workdir", tmp_path / "single", "--out", tmp_path / "single.npz"],
        devices=4,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = single.communicate(timeout=600)
    assert single.returncode == 0, err[-3000:]

    coordinator = f"127.0.0.1:{_free_port()}"
    multi = ["--config", CONFIG, "--workdir", tmp_path / "multi", "--out", tmp_path / "multi.npz"]
    procs = [
        run_script(
            [*multi, "--coordinator", coordinator, "--num-processes", 2, "--process-id", i],
            devices=2,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        line = [x for x in out.splitlines() if x.startswith("results ")][-1]
        results = json.loads(line[len("results ") :])
        assert results["num_processes"] == 2 and results["num_devices"] == 4

    a, b = flatten(load_npz(tmp_path / "single.npz")), flatten(load_npz(tmp_path / "multi.npz"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
