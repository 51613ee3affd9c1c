"""Two real processes on loopback: jax.distributed init, a cross-process mesh, HF load/export and orbax restore."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tests.models.test_hf_io import tiny_qwen2

WORKER = Path(__file__).with_name("multihost_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_load_export_checkpoint(tmp_path):
    model = tiny_qwen2()
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(tmp_path / "hf"), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    for i, (code, out, err) in enumerate(outputs):
        assert code == 0 and f"ok {i}" in out, f"process {i} failed:\n{err[-3000:]}"
    assert "restored_step=3" in outputs[0][1]

    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
