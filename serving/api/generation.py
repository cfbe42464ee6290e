"""Chat and completion requests, end to end: parse, route, stream or collect, measure.

These two routes are plain ASGI apps rather than FastAPI endpoints: they carry every
generated token, and FastAPI's dependency solving plus Starlette's streaming task group
cost more per request than the rest of the gateway together (benchmarks/gateway_overhead.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Literal

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from serving.access import ADMIN_LABEL, Tenancy, to_ref
from serving.api.body_gate import BodyGate
from serving.api.chat_tools import ChatPlan, plan_chat
from serving.api.parsing import parse_body, read_body
from serving.api.responses import SSE_DONE, ChoiceOutput, ResponseFormatter, sse
from serving.api.schemas import ChatCompletionRequest, CompletionRequest
from serving.engines.base import AdapterRef, GenerationRequest, TextDelta
from serving.errors import ApiError, EngineFailed, InvalidRequest, RequestTimeout
from serving.limits import Slot
from serving.metrics import GatewayMetrics, RequestTimer
from serving.router import RoutedStream, Router
from tuneserve.adapters.registry import AdapterRecord
from tuneserve.tool_calls.formats import ToolFormat

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's code for "client went away"; a metrics label only
Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class GenerationRoute:
    path: str
    kind: Kind
    body: type[ChatCompletionRequest] | type[CompletionRequest]
    summary: str  # its title in /docs


GENERATION_ROUTES = (
    GenerationRoute("/v1/chat/completions", "chat", ChatCompletionRequest, "Create a chat completion"),
    GenerationRoute("/v1/completions", "completion", CompletionRequest, "Create a completion"),
)


class HangUpWatch:
    """Cancels the request's task when its client disconnects.

    Armed once the body is read, when the server's `receive()` can only report a
    hang-up. One waiting task per request: Starlette's StreamingResponse spends an
    anyio task group on this, and a non-streamed answer would otherwise poll.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._watcher: asyncio.Task[None] | None = None
        self.hung_up = False

    def arm(self) -> None:
        target = asyncio.current_task()
        assert target is not None
        self._watcher = asyncio.get_running_loop().create_task(self._watch(target))

    async def _watch(self, target: asyncio.Task) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.hung_up = True
        target.cancel()

    def disarm(self) -> None:
        """Before the last byte: once a response completes, the server reports a disconnect."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None


class GenerationService:
    def __init__(
        self,
        router: Router,
        metrics: GatewayMetrics,
        tenancy: Tenancy,
        served_model: str,
        max_body_bytes: int,
        timeout_s: float,
        tool_format: ToolFormat,
        bodies: BodyGate,
    ) -> None:
        self.tool_format = tool_format
        self.bodies = bodies
        self.router = router
        self.metrics = metrics
        self.tenancy = tenancy
        self.served_model = served_model
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s

    def endpoint(self, route: GenerationRoute) -> "GenerationEndpoint":
        return GenerationEndpoint(self, route)

    async def serve(self, scope: Scope, receive: Receive, send: Send, route: GenerationRoute) -> None:
        timer = RequestTimer(self.metrics, "chat" if route.kind == "chat" else "completions", None)
        watch = HangUpWatch(receive)
        try:
            await self._serve(Request(scope, receive), send, route, timer, watch)
        except asyncio.CancelledError:
            timer.finish(CLIENT_CLOSED)
            if not watch.hung_up:
                raise  # the server is shutting down
            # Ours, from the watch: nobody is left to answer.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        except ClientDisconnect:  # gone before its body was read: nothing to answer or log
            timer.finish(CLIENT_CLOSED)
        except ApiError as exc:
            timer.finish(exc.status_code)
            raise  # the app's handler writes the OpenAI error body
        except Exception:
            timer.finish(500)
            raise
        finally:
            watch.disarm()

    async def _serve(
        self, http: Request, send: Send, route: GenerationRoute, timer: RequestTimer, watch: HangUpWatch
    ) -> None:
        # Auth inside the gate: a client without a key counts against the bound on
        # bodies in flight too, and its refusal closes the connection its body is on.
        async with self.bodies.reading():
            principal = await self.tenancy.authenticator.authenticate(http.headers.get("authorization"))
            timer.tenant = principal.tenant or ADMIN_LABEL
            raw = await read_body(http, self.max_body_bytes)
        watch.arm()
        body = parse_body(raw, route.body)
        record = await self.tenancy.resolve_model(principal, body.model)
        timer.model = self.served_model
        if record is not None:
            timer.tenant, timer.adapter = record.tenant, record.name
        slot = await self.tenancy.limiter.admit(timer.tenant)
        try:
            await self._generate(body, record, route, timer, slot, send, watch)
        finally:
            # Answers release the slot as their last byte leaves (a client may send its next
            # request at once), charging their usage; a request that ended any other way
            # (refused, timed out, hung up) is charged what it streamed.
            slot.release(timer.tokens_seen)

    async def _generate(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        record: AdapterRecord | None,
        route: GenerationRoute,
        timer: RequestTimer,
        slot: Slot,
        send: Send,
        watch: HangUpWatch,
    ) -> None:
        ref = to_ref(record) if record else None
        if needs_grammar_work(body):
            # A new tool set or schema compiles its grammar (up to ~0.1 s for 128 tools):
            # off the event loop, which carries every other request's tokens.
            request, plan = await asyncio.to_thread(to_generation_request, body, ref, self.tool_format)
        else:
            request, plan = to_generation_request(body, ref, self.tool_format)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            # A non-streamed request may be generated whole inside open().
            async with asyncio.timeout_at(deadline):
                routed = await self.router.open(request)
        except TimeoutError:
            raise self._timeout() from None
        except InvalidRequest as exc:
            if exc.param == "max_tokens":
                # Engines know one budget; the client may have named it max_completion_tokens.
                exc.param = body.max_tokens_param()
            raise
        timer.routed(routed.backend)
        formatter = ResponseFormatter(route.kind, request.request_id, body.model)
        parsing = plan.parsing if plan is not None else None
        wants_logprobs = request.params.logprobs is not None
        choices = [
            ChoiceOutput(i, route.kind, parsing.parser() if parsing else None, wants_logprobs)
            for i in range(request.params.n)
        ]
        headers = [(b"x-request-id", request.request_id.encode()), (b"x-tuneserve-backend", routed.backend.encode())]
        if body.stream:
            await self._stream(routed, formatter, choices, timer, slot, body.include_usage, deadline, send, headers, watch)
        else:
            await self._respond_whole(routed, formatter, choices, timer, slot, deadline, send, headers, watch)

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(f"Generation did not finish within {self.timeout_s:.0f}s.")

    async def _respond_whole(
        self,
        routed: RoutedStream,
        formatter: ResponseFormatter,
        choices: list[ChoiceOutput],
        timer: RequestTimer,
        slot: Slot,
        deadline: float,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        watch: HangUpWatch,
    ) -> None:
        usage = None
        try:
            async with asyncio.timeout_at(deadline):
                async for event in routed.events():
                    if isinstance(event, TextDelta):
                        timer.on_tokens(event.tokens, event.timed)
                        choice = _choice_of(choices, event, routed.backend)
                        choice.feed(event)
                        if event.finish_reason is not None:
                            choice.end(event.finish_reason)
                    else:
                        usage = event
        except TimeoutError:
            raise self._timeout() from None
        finally:
            await routed.aclose()
        if usage is None:
            raise EngineFailed(f"{routed.backend} ended without usage")
        for choice in choices:
            if choice.finish_reason is None:
                choice.end("stop")
        payload = formatter.whole(choices, usage)
        slot.release(usage.total_tokens)
        timer.finish(200, usage.prompt_tokens, usage.completion_tokens)
        watch.disarm()
        await _send_json(send, payload, headers)

    async def _stream(
        self,
        routed: RoutedStream,
        formatter: ResponseFormatter,
        choices: list[ChoiceOutput],
        timer: RequestTimer,
        slot: Slot,
        include_usage: bool,
        deadline: float,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        watch: HangUpWatch,
    ) -> None:
        # Headers, the role chunk and the first text leave in one socket write: the
        # server's transport merges what is sent in one loop turn (http_protocol.py).
        await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]})
        openings = [opening for c in choices if (opening := c.opening()) is not None]
        if openings:
            await send({"type": "http.response.body", "body": formatter.chunks(openings), "more_body": True})
        ended = False  # the client has its last byte
        try:
            async with asyncio.timeout_at(deadline):
                async for event in routed.events():
                    if isinstance(event, TextDelta):
                        timer.on_tokens(event.tokens, event.timed)
                        choice = _choice_of(choices, event, routed.backend)
                        out = choice.feed(event)
                        if event.finish_reason is not None:
                            out += choice.end(event.finish_reason)
                        if out:
                            await send({"type": "http.response.body", "body": formatter.chunks(out), "more_body": True})
                    elif not ended:
                        # The Usage ends the answer: the client gets its end now, while
                        # the engine tidies up (vLLM's [DONE] and end of body follow).
                        ended = True
                        tail = formatter.chunks([end for c in choices if c.finish_reason is None for end in c.end("stop")])
                        if include_usage:
                            tail += formatter.usage_chunk(event)
                        slot.release(event.total_tokens)
                        timer.finish(200, event.prompt_tokens, event.completion_tokens)
                        await self._end_stream(send, tail, watch)
            if not ended:
                raise EngineFailed(f"{routed.backend} ended without usage")
        except (TimeoutError, ApiError) as exc:
            if ended:
                log.warning("%s failed after %s was answered: %s", routed.backend, formatter.request_id, exc)
                return
            # Headers are gone already: the error travels as an SSE event, as OpenAI does.
            error = self._timeout() if isinstance(exc, TimeoutError) else exc
            log.warning("stream %s failed after first byte: %s", formatter.request_id, error)
            slot.release(timer.tokens_seen)
            timer.finish(error.status_code)
            await self._end_stream(send, sse(error.body()), watch)
        finally:
            await routed.aclose()

    @staticmethod
    async def _end_stream(send: Send, tail: bytes, watch: HangUpWatch) -> None:
        watch.disarm()
        await send({"type": "http.response.body", "body": tail + SSE_DONE, "more_body": False})


SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


async def _send_json(send: Send, payload: dict, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    start_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": 200, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


class GenerationEndpoint:
    """The ASGI app of one route (a class, so Starlette does not wrap it as a function endpoint)."""

    def __init__(self, service: GenerationService, route: GenerationRoute) -> None:
        self.service = service
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.service.serve(scope, receive, send, self.route)


def _choice_of(choices: list[ChoiceOutput], event: TextDelta, backend: str) -> ChoiceOutput:
    if not 0 <= event.choice < len(choices):
        raise EngineFailed(f"{backend} answered choice {event.choice} of {len(choices)}")
    return choices[event.choice]


def needs_grammar_work(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return isinstance(body, ChatCompletionRequest) and bool(
        body.tools or (body.response_format is not None and body.response_format.type != "text")
    )


def to_generation_request(
    body: ChatCompletionRequest | CompletionRequest, adapter: AdapterRef | None, tool_format: ToolFormat
) -> tuple[GenerationRequest, ChatPlan | None]:
    if isinstance(body, ChatCompletionRequest):
        plan = plan_chat(body, tool_format)
        request = GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            kind="chat",
            params=body.sampling(body.effective_max_tokens(), body.logprobs_wanted(), plan.grammar),
            messages=tuple(plan.rendered.messages),
            tools=tuple(plan.rendered.tools or ()),
            adapter=adapter,
            stream=body.stream,
        )
        return request, plan
    request = GenerationRequest(
        request_id=f"cmpl-{uuid.uuid4().hex}",
        kind="completion",
        params=body.sampling(body.effective_max_tokens(), body.logprobs, None),
        prompt=body.prompt_text(),
        adapter=adapter,
        stream=body.stream,
    )
    return request, None
