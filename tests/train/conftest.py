"""Fixtures for the training-engine tests."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest


@pytest.fixture
def eight_devices(request):
    """Ensures 8 (forced CPU) devices: without them, reruns this test in a subprocess that has
    XLA_FLAGS=--xla_force_host_platform_device_count=8 and skips the in-process run."""
    if jax.device_count() >= 8:
        return jax.devices()[:8]
    if os.environ.get("CNN_JAX_TEST_SUBPROCESS"):
        pytest.fail("8 devices requested but the subprocess has fewer")
    env = dict(
        os.environ,
        CNN_JAX_TEST_SUBPROCESS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(request.config.rootpath),
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    pytest.skip("ran in a subprocess with 8 forced CPU devices (passed)")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Shares compiled executables between tests: most tests build the same tiny programs
    (init, step, eval) from fresh closures, which JAX's in-memory cache cannot match but the
    persistent cache (keyed by the program text) can. Saves most of this suite's time."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
