"""Routes a request to the first engine that can start it, in priority order.

An engine that is down, or fails before its first text (connect error, 5xx,
timeout), hands the request to the next one; the client never sees it. Once text
has flowed, the request is bound to that engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from serving.engines.base import Engine, GenerationEvent, GenerationRequest
from serving.errors import EngineFailed, EngineUnavailable, FallbackReason, NoEngineAvailable
from serving.metrics import GatewayMetrics

log = logging.getLogger(__name__)

NO_ENGINE_RETRY_S = 5.0  # a 503's Retry-After when no engine can tell when it is back


@dataclass
class RoutedStream:
    backend: str
    first: GenerationEvent
    rest: AsyncIterator[GenerationEvent]

    async def events(self) -> AsyncIterator[GenerationEvent]:
        yield self.first
        async for event in self.rest:
            yield event

    async def aclose(self) -> None:
        await self.rest.aclose()  # type: ignore[attr-defined]


class Router:
    def __init__(self, engines: Sequence[Engine], metrics: GatewayMetrics) -> None:
        self.engines = list(engines)
        self.metrics = metrics

    def any_ready(self) -> bool:
        return any(engine.is_ready() for engine in self.engines)

    def _fell_back(self, index: int, reason: FallbackReason) -> None:
        if index + 1 < len(self.engines):
            self.metrics.fell_back(self.engines[index].name, self.engines[index + 1].name, reason)

    async def open(self, request: GenerationRequest) -> RoutedStream:
        """Start the request on an engine and return it with its first event."""
        failures: list[str] = []
        for index, engine in enumerate(self.engines):
            if not engine.is_ready():
                failures.append(f"{engine.name}: not ready")
                self._fell_back(index, "not_ready")
                continue
            stream = engine.generate(request)
            try:
                first = await stream.__anext__()
            except EngineUnavailable as exc:
                await stream.aclose()
                log.warning("%s could not take %s: %s", engine.name, request.request_id, exc)
                failures.append(f"{engine.name}: {exc.reason}")
                self._fell_back(index, exc.reason)
                continue
            except StopAsyncIteration:
                raise EngineFailed(f"{engine.name} returned an empty stream") from None
            return RoutedStream(engine.name, first, stream)
        raise NoEngineAvailable(
            "No inference engine can serve this request right now ("
            + "; ".join(failures)
            + "). Retry later.",
            retry_after_s=self._soonest_back(),
        )

    def _soonest_back(self) -> float:
        hints = [hint for engine in self.engines if (hint := engine.retry_after_s()) is not None]
        return min(hints) if hints else NO_ENGINE_RETRY_S
