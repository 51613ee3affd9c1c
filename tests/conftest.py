"""Test-wide setup: 8 fake CPU devices for sharding tests, deterministic numerics.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before anything imports jax.
"""

import os

# On a loaded 2-core machine one of the 8 device threads can take longer than XLA:CPU's 40 s collective
# deadline to reach a rendezvous, which aborts the process; the deadline guards against real hangs only.
CPU_COLLECTIVE_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds=900"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {CPU_COLLECTIVE_TIMEOUT}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    del config
    assert jax.device_count() == 8, (
        "tests expect 8 fake CPU devices; XLA_FLAGS was set too late "
        f"(got {jax.device_count()} devices)"
    )


@pytest.fixture
def highest_precision():
    """fp32 matmuls at full precision, as parity tests against torch require."""
    with jax.default_matmul_precision("highest"):
        yield
