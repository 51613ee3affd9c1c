"""Fixtures for tests against a real judge server: vLLM (CPU build, its own venv) serving SmolLM2-135M-Instruct
on 127.0.0.1, one server for the session, always killed (process group) when the session ends.

Skipped with the reason when the vLLM venv is absent (`python -m balcap_jax.tools.judge_server build`; CI
builds it) or the SmolLM2 wheel is not installed.
"""

from __future__ import annotations

import pytest

from balcap_jax.tools import judge_server
from tests.models.smollm2_fixture import smollm2_hf_dir  # noqa: F401  (session fixture)


@pytest.fixture(scope="session")
def vllm_server(smollm2_hf_dir, tmp_path_factory):  # noqa: F811
    venv = judge_server.default_venv()
    if not judge_server.venv_ready(venv):
        pytest.skip(f"no vLLM CPU venv at {venv}: build it once with `python -m balcap_jax.tools.judge_server build`")
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    server = judge_server.VllmServer(smollm2_hf_dir, venv=venv, log_path=log)
    with server:
        yield server


@pytest.fixture
def live_vllm(vllm_server):
    """The session server, running: a test that stopped it (outage tests) gets it restarted for the next one."""
    if vllm_server.process is None:
        vllm_server.start()
    yield vllm_server
    if vllm_server.process is None:
        vllm_server.start()
