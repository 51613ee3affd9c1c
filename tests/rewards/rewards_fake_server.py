"""A small OpenAI-compatible HTTP server on 127.0.0.1 for judge tests: scripted answers, injected faults.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) for httpx, serves
POST /v1/chat/completions and POST /v1/completions from `RuleBasedResponder`, and GET /stats with its counters.
Faults are decided per request body (a canonical JSON string) and per attempt of that body, by `ServerSpec`:

  permanent_pct: % of bodies that fail on every attempt (unrecoverable), with one of PERMANENT_FAULTS;
  transient_pct: % of bodies that fail on their first attempt only (recoverable), with one of TRANSIENT_FAULTS;
  forced_fault:  a fault applied to every attempt of every body (single-fault tests);
  first_attempt_fault: a fault applied to the first attempt of every body only;
  garbage_first_requests: the first n requests of the server's life answer non-JSON text (whatever their body).
Besides those lists, "http_400" (a non-retryable client error) can be forced.

Run in a thread of the test process (`FakeOpenAIServer(spec).start()`) or, for throughput tests where the
client should not share the GIL with the server, as a subprocess (`serve_in_subprocess(spec)`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import hashlib
import json
import pathlib
import subprocess
import sys
import threading
import time

from balcap_jax.rewards.judges.protocol import ImagePart, JudgeRequest, Message
from balcap_jax.rewards.judges.scripted import RuleBasedResponder

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}
GARBAGE = "I am not sure what you mean."
PERMANENT_FAULTS = ("http_500", "http_429", "drop", "timeout", "malformed_json", "empty_choices")
TRANSIENT_FAULTS = PERMANENT_FAULTS + ("slow", "garbage_text")


@dataclasses.dataclass
class ServerSpec:
    latency_s: float = 0.0
    permanent_pct: float = 0.0
    transient_pct: float = 0.0
    forced_fault: str | None = None
    first_attempt_fault: str | None = None
    garbage_first_requests: int = 0
    timeout_sleep_s: float = 2.0  # "timeout" faults sleep this long (longer than the client's timeout)
    slow_sleep_s: float = 0.05  # "slow" faults answer correctly after this delay
    retry_after_s: float = 0.0  # the Retry-After header of "http_429" faults
    seed: int = 0


def body_key(body: dict) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def _fraction(key: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def planned_fault(spec: ServerSpec, key: str, attempt: int) -> str | None:
    """The fault for the `attempt`-th request (0-based) carrying body `key`."""
    if spec.forced_fault:
        return spec.forced_fault
    if spec.first_attempt_fault:
        return spec.first_attempt_fault if attempt == 0 else None
    u = _fraction(key, spec.seed) * 100
    pick = int(_fraction(key, spec.seed + 1) * 1e6)
    if u < spec.permanent_pct:
        return PERMANENT_FAULTS[pick % len(PERMANENT_FAULTS)]
    if u < spec.permanent_pct + spec.transient_pct and attempt == 0:
        return TRANSIENT_FAULTS[pick % len(TRANSIENT_FAULTS)]
    return None


def request_from_body(body: dict) -> JudgeRequest:
    """The JudgeRequest a chat/completions body encodes (images decoded from their data URLs)."""
    if "prompt" in body:
        return JudgeRequest(messages=(Message("user", (body["prompt"],)),))
    messages = []
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            parts = (content,)
        else:
            parts = tuple(
                part["text"] if part["type"] == "text"
                else ImagePart(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))
                for part in content
            )  # fmt: skip
        messages.append(Message(message["role"], parts))
    return JudgeRequest(messages=tuple(messages))


class FakeOpenAIServer:
    def __init__(self, spec: ServerSpec = ServerSpec(), port: int = 0):
        self.spec = spec
        self.port = port
        self.responder = RuleBasedResponder()
        self.attempts: collections.Counter[str] = collections.Counter()
        self.successes: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.authorization: set[str] = set()
        self.paths: collections.Counter[str] = collections.Counter()
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def http_requests(self) -> int:
        return sum(self.attempts.values())

    def stats(self) -> dict:
        return {
            "http_requests": self.http_requests,
            "process_cpu_s": time.process_time(),
            "max_in_flight": self.max_in_flight,
            "faults": dict(self.faults),
            "bodies": len(self.attempts),
            "attempts": dict(self.attempts),
            "successes": dict(self.successes),
        }

    # --- HTTP ---------------------------------------------------------------------------------------------

    @staticmethod
    def _write(writer, status: int, payload: bytes, extra_headers: dict[str, str] | None = None) -> None:
        reason = _REASONS[status]
        headers = {"Content-Type": "application/json", "Content-Length": str(len(payload))} | (extra_headers or {})
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode() + payload)

    async def _answer(self, path: str, headers: dict[str, str], raw: bytes, writer) -> bool:
        """Handle one request; returns False when the connection must close."""
        if path.endswith("/stats"):
            self._write(writer, 200, json.dumps(self.stats()).encode())
            return True
        if not path.endswith(("/chat/completions", "/completions")):
            self._write(writer, 404, b'{"error": "not found"}')
            return True
        self.paths[path] += 1
        if "authorization" in headers:
            self.authorization.add(headers["authorization"])
        body = json.loads(raw)
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer_completion(body, writer)
        finally:
            self.in_flight -= 1

    async def _answer_completion(self, body: dict, writer) -> bool:
        key = body_key(body)
        fault = planned_fault(self.spec, key, self.attempts[key])
        if self.http_requests < self.spec.garbage_first_requests:
            fault = "garbage_text"
        self.attempts[key] += 1
        if fault:
            self.faults[fault] += 1
        if self.spec.latency_s:
            await asyncio.sleep(self.spec.latency_s)
        if fault == "timeout":  # never answers: the client times out first (or sees the connection die)
            await asyncio.sleep(self.spec.timeout_sleep_s)
        if fault in ("drop", "timeout"):
            writer.transport.abort()
            return False
        if fault == "http_400":
            self._write(writer, 400, b'{"error": "bad request"}')
            return True
        if fault == "http_500":
            self._write(writer, 500, b'{"error": "injected"}')
            return True
        if fault == "http_429":
            self._write(writer, 429, b'{"error": "slow down"}', {"Retry-After": str(self.spec.retry_after_s)})
            return True
        if fault == "malformed_json":
            self._write(writer, 200, b'{"choices": [{"message": {"content": "tru')
            return True
        if fault == "empty_choices":
            self._write(writer, 200, b'{"id": "x", "choices": []}')
            return True
        if fault == "slow":
            await asyncio.sleep(self.spec.slow_sleep_s)
        def answer(one_body: dict) -> str:
            return GARBAGE if fault == "garbage_text" else self.responder(request_from_body(one_body))

        if "prompt" in body:  # a list of prompts is a batched request: answer each, choices in reverse order
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            texts = [answer({"prompt": p}) for p in prompts]
            choices = [{"index": i, "text": t, "finish_reason": "stop"} for i, t in enumerate(texts)][::-1]
            payload = {"object": "text_completion", "choices": choices}
        else:
            message = {"role": "assistant", "content": answer(body)}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            payload = {"object": "chat.completion", "choices": [choice]}
        self._write(writer, 200, json.dumps(payload | {"model": body.get("model", "")}).encode())
        if fault != "garbage_text":
            self.successes[key] += 1
        return True

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    break
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", 0)))
                path = request_line.decode("latin-1").split()[1]
                if not await self._answer(path, headers, raw, writer):
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    # --- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> "FakeOpenAIServer":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._connection, "127.0.0.1", self.port, backlog=1024)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="fake-openai-server")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@contextlib.contextmanager
def serve_in_subprocess(spec: ServerSpec):
    """Run the server in a child Python process; yields its base URL (…/v1)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.rewards.rewards_fake_server", json.dumps(dataclasses.asdict(spec))],
        stdout=subprocess.PIPE,
        text=True,
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )
    try:
        line = process.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"fake server subprocess failed to start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        process.terminate()
        process.wait(10)


def fetch_stats(base_url: str) -> dict:
    import httpx

    return httpx.get(f"{base_url}/stats", timeout=10).json()


if __name__ == "__main__":
    server = FakeOpenAIServer(ServerSpec(**json.loads(sys.argv[1]))).start()
    print(f"PORT {server.port}", flush=True)
    while True:
        time.sleep(3600)
