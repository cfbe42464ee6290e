"""Chat and completion requests, end to end: parse, route, stream or collect, measure."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from serving.api.parsing import parse_body, read_body
from serving.api.responses import SSE_DONE, ResponseFormatter, sse
from serving.api.schemas import ChatCompletionRequest, CompletionRequest
from serving.engines.base import AdapterRef, GenerationRequest, TextDelta, Usage
from serving.errors import ApiError, EngineFailed, RequestTimeout
from serving.metrics import GatewayMetrics, RequestTimer
from serving.router import RoutedStream, Router
from serving.tenancy import ADMIN_LABEL, Tenancy, to_ref

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's code for "client went away"; a metrics label only
DISCONNECT_POLL_S = 0.25


class GenerationService:
    def __init__(
        self,
        router: Router,
        metrics: GatewayMetrics,
        tenancy: Tenancy,
        served_model: str,
        max_body_bytes: int,
        timeout_s: float,
    ) -> None:
        self.router = router
        self.metrics = metrics
        self.tenancy = tenancy
        self.served_model = served_model
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s

    async def handle(self, http: Request, kind: Literal["chat", "completion"]) -> Response:
        endpoint = "chat" if kind == "chat" else "completions"
        timer = RequestTimer(self.metrics, endpoint, None)
        try:
            principal = self.tenancy.authenticator.authenticate(http.headers.get("authorization"))
            timer.tenant = principal.tenant or ADMIN_LABEL
            raw = await read_body(http, self.max_body_bytes)
            body = parse_body(raw, ChatCompletionRequest if kind == "chat" else CompletionRequest)
            record = self.tenancy.resolve_model(principal, body.model)
            timer.model = self.served_model
            if record is not None:
                timer.tenant, timer.adapter = record.tenant, record.name
            tenant = timer.tenant
            self.tenancy.limiter.acquire(tenant)
            timer.on_finish = lambda tokens: self.tenancy.limiter.release(tenant, tokens)
            request = to_generation_request(body, to_ref(record) if record else None)
            deadline = time.monotonic() + self.timeout_s
            try:
                # A non-streamed request may be generated whole inside open().
                async with asyncio.timeout_at(_loop_time(deadline)):
                    routed = await self.router.open(request)
            except TimeoutError:
                raise RequestTimeout(f"Generation did not finish within {self.timeout_s:.0f}s.") from None
        except ApiError as exc:
            timer.finish(exc.status_code)
            raise
        except Exception:
            timer.finish(500)
            raise
        timer.routed(routed.backend)
        formatter = ResponseFormatter(kind, request.request_id, body.model)
        headers = {"x-request-id": request.request_id, "x-tuneserve-backend": routed.backend}
        if body.stream:
            return StreamingResponse(
                self._stream(routed, formatter, timer, body.include_usage, deadline),
                media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache"},
            )
        return await self._respond_whole(http, routed, formatter, timer, headers, deadline)

    async def _collect(self, routed: RoutedStream, timer: RequestTimer, deadline: float) -> tuple[str, str, Usage]:
        parts: list[str] = []
        finish, usage = "stop", None
        async with asyncio.timeout_at(_loop_time(deadline)):
            async for event in routed.events():
                if isinstance(event, TextDelta):
                    timer.on_tokens(event.tokens, event.timed)
                    parts.append(event.text)
                    finish = event.finish_reason or finish
                else:
                    usage = event
        if usage is None:
            raise EngineFailed(f"{routed.backend} ended without usage")
        return "".join(parts), finish, usage

    async def _respond_whole(
        self,
        http: Request,
        routed: RoutedStream,
        formatter: ResponseFormatter,
        timer: RequestTimer,
        headers: dict[str, str],
        deadline: float,
    ) -> Response:
        task = asyncio.create_task(self._collect(routed, timer, deadline))
        try:
            # Cancel the generation if the client hangs up while waiting.
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await http.is_disconnected():
                    task.cancel()
                    timer.finish(CLIENT_CLOSED)
                    return Response(status_code=CLIENT_CLOSED)
            text, finish, usage = task.result()
        except TimeoutError:
            error = RequestTimeout(f"Generation did not finish within {self.timeout_s:.0f}s.")
            timer.finish(error.status_code)
            raise error from None
        except ApiError as exc:
            timer.finish(exc.status_code)
            raise
        finally:
            if not task.done():
                task.cancel()
            await routed.aclose()
        timer.finish(200, usage.prompt_tokens, usage.completion_tokens)
        return JSONResponse(formatter.whole(text, finish, usage), headers=headers)

    async def _stream(
        self,
        routed: RoutedStream,
        formatter: ResponseFormatter,
        timer: RequestTimer,
        include_usage: bool,
        deadline: float,
    ) -> AsyncIterator[bytes]:
        status, usage, finish = 200, None, "stop"
        # Chunks ready together go out in one write: the role chunk with the first text,
        # and finish, usage and [DONE] at the end. Each write is a syscall here and a
        # wake-up in the client; every text chunk still leaves as soon as it exists.
        pending = formatter.chunk("", first=True) if formatter.kind == "chat" else b""
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                async for event in routed.events():
                    if isinstance(event, TextDelta):
                        timer.on_tokens(event.tokens, event.timed)
                        finish = event.finish_reason or finish
                        if event.text:
                            yield pending + formatter.chunk(event.text)
                            pending = b""
                    else:
                        usage = event
            tail = pending + formatter.chunk("", finish_reason=finish)
            if include_usage and usage is not None:
                tail += formatter.usage_chunk(usage)
            yield tail + SSE_DONE
        except TimeoutError:
            error = RequestTimeout(f"Generation did not finish within {self.timeout_s:.0f}s.")
            status = error.status_code
            yield pending + sse(error.body()) + SSE_DONE
        except ApiError as exc:
            # Headers are gone already: the error travels as an SSE event, as OpenAI does.
            status = exc.status_code
            log.warning("stream %s failed after first byte: %s", formatter.request_id, exc)
            yield pending + sse(exc.body()) + SSE_DONE
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            await routed.aclose()
            if usage is None:
                timer.finish(status)
            else:
                timer.finish(status, usage.prompt_tokens, usage.completion_tokens)


def to_generation_request(
    body: ChatCompletionRequest | CompletionRequest, adapter: AdapterRef | None
) -> GenerationRequest:
    if isinstance(body, ChatCompletionRequest):
        return GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            kind="chat",
            params=body.sampling(body.effective_max_tokens()),
            messages=tuple(m.as_template_message() for m in body.messages),
            adapter=adapter,
            stream=body.stream,
        )
    return GenerationRequest(
        request_id=f"cmpl-{uuid.uuid4().hex}",
        kind="completion",
        params=body.sampling(body.max_tokens),
        prompt=body.prompt_text(),
        adapter=adapter,
        stream=body.stream,
    )


def _loop_time(deadline: float) -> float:
    """Convert a time.monotonic() deadline to the event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())
