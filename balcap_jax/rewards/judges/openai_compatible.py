"""An async judge client for OpenAI-compatible servers (vLLM, SGLang, TGI, hosted APIs).

Built on httpx (a few small connection pools per event loop; one loop at a time) and tenacity (retry policy):
- chat (`/chat/completions`, images as base64 data URLs for multimodal judges, each image downscaled and
  re-encoded once for the client's life, see wire_images.py) or raw completions
  (`/completions`, text only; concurrent prompts with equal parameters optionally batched into one request);
- bounded concurrency: a semaphore caps attempts in flight, so a batch of thousands of calls can be awaited at
  once without opening thousands of sockets; sleeping retries hold no slot;
- per-request timeout; retries with exponential backoff and jitter on timeouts, connection errors and drops,
  HTTP 408/409/429/5xx, and unusable response bodies (invalid JSON, empty `choices`); `Retry-After` is honoured;
- several base URLs used round-robin: requests start on successive URLs and each retry moves to the next one,
  so a dead replica costs one attempt, not a failed request;
- the API key is read once from the environment variable the config names; it is kept out of every repr, log
  line and error message;
- structured output: a request's `response_schema` goes out as `response_format` (json_schema, the form vLLM and
  SGLang accept, or json_object, or nothing);
- an on-disk response cache (`ResponseCache`) keyed by (model, request body): a second identical run makes no
  HTTP request. Only replies the request `accept`s are stored, so an unusable answer is asked again next run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import ssl
import time
from typing import Any, Callable, Literal, Mapping, TypeVar

import httpx
import tenacity

from balcap_jax.rewards.judges.protocol import (
    ImagePart,
    JudgeReply,
    JudgeRequest,
    JudgeUnavailable,
    Message,
    ResponseSchema,
)
from balcap_jax.rewards.judges.response_cache import ResponseCache, cache_key
from balcap_jax.rewards.judges.wire_images import DEFAULT_MAX_SIDE, WireImageCache

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

_RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# httpcore scans every pooled connection for every queued request, so one pool of hundreds of connections costs
# O(connections^2) per batch; several small pools (clients) used round-robin keep that scan short.
_CONNECTIONS_PER_CLIENT = 4
RESPONSE_FORMATS = ("json_schema", "json_object", "none")


def plain_completion_prompt(messages: tuple[Message, ...]) -> str:
    """Default prompt for the completions API: the messages' texts, separated by blank lines."""
    if any(message.images for message in messages):
        raise ValueError("the completions API takes text only; use api='chat' with a multimodal judge for images")
    return "\n\n".join(message.text for message in messages if message.role != "assistant")


@dataclasses.dataclass(frozen=True)
class OpenAICompatibleConfig:
    """How to reach and call one judge model.

    base_urls: server roots ending in /v1 (e.g. "http://10.0.0.5:8000/v1"); several are used round-robin.
    api: "chat" (messages, images allowed) or "completions" (a prompt string, see `completion_prompt`).
    api_key_env: name of the environment variable holding the API key (None: no Authorization header).
    multimodal: whether the model accepts images (requests with images to a text judge are refused early).
    max_concurrency: HTTP attempts in flight at once.
    request_timeout_s / connect_timeout_s: per attempt.
    max_attempts: attempts per request before giving up (JudgeUnavailable).
    backoff_initial_s / backoff_max_s: exponential backoff with jitter between attempts.
    max_retry_after_s: cap on a server's Retry-After.
    cache_path: SQLite file for the response cache (None: no cache).
    extra_body: extra JSON fields for every request (e.g. {"chat_template_kwargs": {"enable_thinking": False}}).
    completion_batch_size / completion_batch_window_s: with api="completions", prompts with identical sampling
        parameters arriving within the window are sent as one request with a list of prompts (vLLM and SGLang
        accept it); 1 sends one prompt per request. The cache still keys each prompt on its own.
    image_max_side: longest side in pixels of the images sent (larger ones are downscaled; 0 keeps the size).
    image_cache_size: prepared images kept in memory (by content digest) for reuse by later requests.
    response_format: how a request's JSON Schema is sent: "json_schema" (constrained decoding to the schema),
        "json_object" (any JSON object) or "none" (not sent; for servers that reject response_format).
    """

    model: str
    base_urls: tuple[str, ...]
    api: Literal["chat", "completions"] = "chat"
    api_key_env: str | None = None
    multimodal: bool = False
    max_concurrency: int = 64
    request_timeout_s: float = 120.0
    connect_timeout_s: float = 10.0
    max_attempts: int = 6
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 60.0
    cache_path: str | None = None
    extra_body: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    completion_prompt: Callable[[tuple[Message, ...]], str] = plain_completion_prompt
    completion_batch_size: int = 1
    completion_batch_window_s: float = 0.002
    image_max_side: int = DEFAULT_MAX_SIDE
    image_cache_size: int = 256
    response_format: Literal["json_schema", "json_object", "none"] = "json_schema"

    def __post_init__(self):
        if isinstance(self.base_urls, str):
            object.__setattr__(self, "base_urls", (self.base_urls,))
        object.__setattr__(self, "base_urls", tuple(url.rstrip("/") for url in self.base_urls))
        if not self.model:
            raise ValueError("OpenAICompatibleConfig.model is empty; give the served model name")
        if not self.base_urls:
            raise ValueError("OpenAICompatibleConfig.base_urls is empty; give at least one http(s)://host:port/v1")
        for url in self.base_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"OpenAICompatibleConfig.base_urls: {url!r} must start with http:// or https://")
        if self.api not in ("chat", "completions"):
            raise ValueError(f"OpenAICompatibleConfig.api must be 'chat' or 'completions', got {self.api!r}")
        if self.response_format not in RESPONSE_FORMATS:
            raise ValueError(
                f"OpenAICompatibleConfig.response_format must be one of {RESPONSE_FORMATS}, "
                f"got {self.response_format!r}"
            )
        if self.image_max_side < 0:
            raise ValueError(
                f"OpenAICompatibleConfig.image_max_side must be >= 0 (0 keeps the size), got {self.image_max_side}"
            )
        for name in ("max_concurrency", "max_attempts", "completion_batch_size", "image_cache_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"OpenAICompatibleConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"OpenAICompatibleConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("OpenAICompatibleConfig: need 0 <= backoff_initial_s <= backoff_max_s")


class _RetryableResponse(Exception):
    """A response worth another attempt (429/5xx, unusable body); carries the server's Retry-After, if any."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _FatalResponse(Exception):
    """A response that another attempt will not fix (400, 401, 404, ...)."""


def _retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _chat_message(message: Message, image_urls: Mapping[str, str]) -> dict[str, Any]:
    """The chat message; images as the data URLs `image_urls` holds for their digests."""
    if not message.images:
        return {"role": message.role, "content": message.text}

    def part(p: str | ImagePart) -> dict[str, Any]:
        if isinstance(p, str):
            return {"type": "text", "text": p}
        if p.digest not in image_urls:
            raise ValueError(f"no prepared data URL for {p!r}; build bodies through OpenAICompatibleJudge.generate")
        return {"type": "image_url", "image_url": {"url": image_urls[p.digest]}}

    return {"role": message.role, "content": [part(p) for p in message.content]}


def response_format(schema: ResponseSchema, mode: str) -> dict[str, Any] | None:
    """The `response_format` field for `schema` in `mode` (see OpenAICompatibleConfig.response_format)."""
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": schema.name, "schema": schema.schema, "strict": True}}
    if mode == "json_object":
        return {"type": "json_object"}
    if mode == "none":
        return None
    raise ValueError(f"response_format mode must be one of {RESPONSE_FORMATS}, got {mode!r}")


@dataclasses.dataclass
class JudgeStats:
    """Counters since construction: requests (generate calls), http_attempts, retries, cache_hits, failures,
    uncached (replies the request did not accept, hence not stored)."""

    requests: int = 0
    http_attempts: int = 0
    retries: int = 0
    cache_hits: int = 0
    failures: int = 0
    uncached: int = 0


class OpenAICompatibleJudge:
    """`Judge` backend speaking the OpenAI HTTP API. Usable from any event loop, one at a time: its HTTP pools and
    semaphore belong to the loop that last used it."""

    def __init__(self, config: OpenAICompatibleConfig, *, cache: ResponseCache | None = None):
        self.config = config
        self.model = config.model
        self.multimodal = config.multimodal
        self._api_key: str | None = None
        if config.api_key_env is not None:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise ValueError(
                    f"OpenAICompatibleConfig.api_key_env names ${config.api_key_env}, which is unset or empty; "
                    "export the key in that variable (or set api_key_env=None for servers without auth)"
                )
            self._api_key = key
        self.cache = cache if cache is not None else (ResponseCache(config.cache_path) if config.cache_path else None)
        self.images = WireImageCache(config.image_max_side, config.image_cache_size)
        self.stats = JudgeStats()
        self._url_counter = itertools.count()
        self._client_load: list[int] = []
        self._batch_loop: asyncio.AbstractEventLoop | None = None
        self._batches: dict[str, list[tuple[str, asyncio.Future]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: list[httpx.AsyncClient] = []
        self._semaphore: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        auth = f"env:{self.config.api_key_env}" if self._api_key else "none"
        return (
            f"OpenAICompatibleJudge(model={self.model!r}, api={self.config.api!r}, "
            f"base_urls={list(self.config.base_urls)}, auth={auth})"
        )

    # --- per-event-loop resources -------------------------------------------------------------------------

    def _resources(self) -> tuple[list[httpx.AsyncClient], asyncio.Semaphore]:
        """The HTTP clients (small connection pools) and the concurrency semaphore of the running loop."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._semaphore is None:
            cfg = self.config
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            num_clients = -(-cfg.max_concurrency // _CONNECTIONS_PER_CLIENT)
            per_client = -(-cfg.max_concurrency // num_clients)
            tls = ssl.create_default_context()  # one context shared by the pools (each costs ~50 ms to build)
            self._clients = [
                httpx.AsyncClient(
                    headers=headers,
                    verify=tls,
                    timeout=httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s),
                    limits=httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client),
                )
                for _ in range(num_clients)
            ]
            self._semaphore = asyncio.Semaphore(cfg.max_concurrency)
            self._loop = loop
            self._client_load = [0] * num_clients
        return self._clients, self._semaphore

    async def aclose(self) -> None:
        """Close the HTTP clients of the current event loop (the cache stays open)."""
        if self._loop is asyncio.get_running_loop():
            for client in self._clients:
                await client.aclose()
        self._clients, self._semaphore, self._loop = [], None, None

    # --- request building -------------------------------------------------------------------------------

    def _check_images_allowed(self, request: JudgeRequest) -> None:
        if request.has_images and not self.multimodal:
            raise ValueError(
                f"judge {self.model!r} is configured text-only (multimodal=False) but the request carries images; "
                "point the visual judge at a VLM and set multimodal=True"
            )

    def request_body(self, request: JudgeRequest, image_urls: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The JSON body sent for `request` (also what the cache key hashes); image_urls: {image digest: data URL}
        of the request's prepared images (`generate` prepares them)."""
        self._check_images_allowed(request)
        body: dict[str, Any] = {"model": self.model}
        if self.config.api == "chat":
            body["messages"] = [_chat_message(message, image_urls or {}) for message in request.messages]
        else:
            body["prompt"] = self.config.completion_prompt(request.messages)
        body.update(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p)
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if request.response_schema is not None:
            wire_format = response_format(request.response_schema, self.config.response_format)
            if wire_format is not None:
                body["response_format"] = wire_format
        body.update(self.config.extra_body)
        return body

    async def _image_urls(self, request: JudgeRequest) -> dict[str, str]:
        """{digest: data URL} of the request's images, each prepared once per client; JudgeUnavailable (a NaN
        reward, a counted error) when an image cannot be decoded."""
        urls: dict[str, str] = {}
        for image in request.images:
            if image.digest not in urls:
                try:
                    urls[image.digest] = await self.images.data_url(image)
                except ValueError as error:
                    self.stats.failures += 1
                    raise JudgeUnavailable(f"{self.model}: {error}") from None
        return urls

    def _endpoint(self, slot: int) -> str:
        base = self.config.base_urls[slot % len(self.config.base_urls)]
        return f"{base}/chat/completions" if self.config.api == "chat" else f"{base}/completions"

    def _reply_text(self, response: httpx.Response) -> str:
        if response.status_code in _RETRYABLE_STATUS:
            raise _RetryableResponse(f"HTTP {response.status_code}", _retry_after_seconds(response))
        if response.status_code != 200:
            raise _FatalResponse(f"HTTP {response.status_code}: {response.text[:300]}")
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.config.api == "chat" else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise _RetryableResponse(f"unusable response body ({type(error).__name__}): {response.text[:200]!r}")
        if not isinstance(text, str):
            raise _RetryableResponse(f"response choice has no text: {str(choice)[:200]!r}")
        return text

    # --- the call ---------------------------------------------------------------------------------------

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        backoff = tenacity.wait_exponential_jitter(
            initial=self.config.backoff_initial_s, max=self.config.backoff_max_s, jitter=self.config.backoff_initial_s
        )(retry_state)
        error = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(error, "retry_after_s", None)
        if retry_after is not None:
            backoff = max(backoff, min(retry_after, self.config.max_retry_after_s))
        return backoff

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        self.stats.retries += 1
        error = retry_state.outcome.exception() if retry_state.outcome else None
        logger.debug("judge %s attempt %d failed (%s); retrying", self.model, retry_state.attempt_number, error)

    async def _attempt(self, body: dict[str, Any], slot: int, read: Callable[[httpx.Response], _T]) -> _T:
        clients, semaphore = self._resources()
        async with semaphore:
            self.stats.http_attempts += 1
            index = min(range(len(clients)), key=self._client_load.__getitem__)  # least-loaded pool
            self._client_load[index] += 1
            try:
                response = await clients[index].post(self._endpoint(slot), json=body)
            finally:
                self._client_load[index] -= 1
        return read(response)

    async def _post_with_retries(self, body: dict[str, Any], read: Callable[[httpx.Response], _T]) -> tuple[_T, int]:
        """(read(response), attempts) of the first usable response; JudgeUnavailable once retries run out."""
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.config.max_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type((httpx.TransportError, _RetryableResponse)),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        # Requests start on successive base URLs; each retry of a request moves on to the next one.
        first_slot = next(self._url_counter)
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    value = await self._attempt(body, first_slot + attempts - 1, read)
        except (httpx.HTTPError, _RetryableResponse, _FatalResponse) as error:
            self.stats.failures += 1
            message = f"{self.model}: gave up after {attempts} attempt(s): {type(error).__name__}: {error}"
            logger.warning("judge call failed: %s", message)
            raise JudgeUnavailable(message) from None
        return value, attempts

    async def generate(self, request: JudgeRequest) -> JudgeReply:
        start = time.perf_counter()
        self.stats.requests += 1
        self._check_images_allowed(request)  # before any image work: a misconfiguration, not a judge failure
        body = self.request_body(request, await self._image_urls(request))
        key = cache_key(self.model, {"api": self.config.api, "body": body}) if self.cache is not None else None
        if key is not None:
            cached = self.cache.get(key)
            # An unusable stored reply (written before replies were checked) is a miss: ask again, overwrite it.
            if cached is not None and request.accepts(cached):
                self.stats.cache_hits += 1
                return JudgeReply(cached, cached=True, latency_s=time.perf_counter() - start, attempts=0)
        if self.config.api == "completions" and self.config.completion_batch_size > 1:
            text, attempts = await self._batched_completion(body)
        else:
            text, attempts = await self._post_with_retries(body, self._reply_text)
        if key is not None:
            if request.accepts(text):
                self.cache.put(key, self.model, text)
            else:
                self.stats.uncached += 1
        return JudgeReply(text, cached=False, latency_s=time.perf_counter() - start, attempts=attempts)

    # --- completions batching -------------------------------------------------------------------------------

    async def _batched_completion(self, body: dict[str, Any]) -> tuple[str, int]:
        """Queue one prompt; prompts with identical parameters that arrive within `completion_batch_window_s`
        travel together as one `/completions` request with a list of prompts (up to completion_batch_size)."""
        loop = asyncio.get_running_loop()
        if self._batch_loop is not loop:
            self._batch_loop, self._batches = loop, {}
        params = {k: v for k, v in body.items() if k != "prompt"}
        group = json.dumps(params, sort_keys=True)
        future = loop.create_future()
        queue = self._batches.setdefault(group, [])
        queue.append((body["prompt"], future))
        if len(queue) >= self.config.completion_batch_size:
            self._send_batch(group, params)
        elif len(queue) == 1:
            loop.call_later(self.config.completion_batch_window_s, self._send_batch, group, params, queue)
        return await future

    def _send_batch(self, group: str, params: dict[str, Any], expected: list | None = None) -> None:
        queue = self._batches.get(group)
        if queue is None or (expected is not None and queue is not expected):
            return  # already sent when it filled up
        del self._batches[group]
        asyncio.ensure_future(self._post_batch(params, queue))

    async def _post_batch(self, params: dict[str, Any], queue: list[tuple[str, asyncio.Future]]) -> None:
        prompts = [prompt for prompt, _ in queue]

        def read(response: httpx.Response) -> list[str]:
            return self._batch_texts(response, len(prompts))

        try:
            texts, attempts = await self._post_with_retries(params | {"prompt": prompts}, read)
        except JudgeUnavailable as error:
            for _, future in queue:
                if not future.done():
                    future.set_exception(JudgeUnavailable(str(error)))
            return
        for (_, future), text in zip(queue, texts):
            if not future.done():
                future.set_result((text, attempts))

    def _batch_texts(self, response: httpx.Response, count: int) -> list[str]:
        """The texts of a batched completions response, in prompt order (choices carry their prompt index)."""
        if response.status_code in _RETRYABLE_STATUS:
            raise _RetryableResponse(f"HTTP {response.status_code}", _retry_after_seconds(response))
        if response.status_code != 200:
            raise _FatalResponse(f"HTTP {response.status_code}: {response.text[:300]}")
        try:
            choices = response.json()["choices"]
            texts = {int(choice["index"]): choice["text"] for choice in choices}
            ordered = [texts[i] for i in range(count)]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise _RetryableResponse(f"unusable batched response ({type(error).__name__}): {response.text[:200]!r}")
        if not all(isinstance(text, str) for text in ordered):
            raise _RetryableResponse("batched response has a choice without text")
        return ordered
