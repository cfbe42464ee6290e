"""Several vLLM replicas of the same model behind one engine named "vllm".

Each replica is a plain VLLMEngine (its own health probe, circuit breaker and, with
gateway-managed adapters, its own adapter LRU). A request tries the replicas in the
order serving/engines/replica_picker.py gives (the adapter's rendezvous owner within
the load bound first); one that cannot start it (down, 5xx, timeout, a 404 load miss)
hands it to the next. Only when none can does this engine raise EngineUnavailable, so
the router falls back to llama.cpp as it does for a single vLLM. The loads come from
each replica's /metrics, scraped on the health-probe interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import AsyncGenerator, Awaitable, Callable, Iterable, Sequence

import aiohttp

from serving.engines.base import Engine, EngineStatus, GenerationEvent, GenerationRequest
from serving.engines.replica_events import NullReplicaObserver, ReplicaObserver, ReplicaState, RoutingDecision
from serving.engines.replica_load import LoadTracker, parse_vllm_load
from serving.engines.replica_picker import ReplicaLoad, pick, preference_order
from serving.engines.vllm import VLLMEngine
from serving.errors import EngineFailed, EngineUnavailable, InvalidRequest
from tuneserve.config import VLLMConfig

log = logging.getLogger(__name__)

Discover = Callable[[], Awaitable[list[str] | None]]


@dataclass
class Replica:
    url: str
    engine: VLLMEngine
    load: LoadTracker


def normalized(url: str) -> str:
    return url.rstrip("/")


class ReplicatedVLLMEngine(Engine):
    name = "vllm"  # one backend for metrics and fallback, however many replicas

    def __init__(
        self,
        config: VLLMConfig,
        make_engine: Callable[[str], VLLMEngine],
        urls: Sequence[str] = (),
        discover: Discover | None = None,
        observer: ReplicaObserver | None = None,
        discovery_target: str | None = None,
    ) -> None:
        self.config = config
        self._make_engine = make_engine
        self._initial = [normalized(u) for u in urls]
        self._discover = discover
        self._discovery_target = discovery_target
        self.observer = observer or NullReplicaObserver()
        self.observer.watch_replicas(self.replica_states)
        self._replicas: dict[str, Replica] = {}
        self._changing = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._retiring: set[asyncio.Task[None]] = set()

    # -- membership

    async def start(self) -> None:
        urls = self._initial
        if self._discover is not None:
            urls = await self._discover() or []
        await self.set_replicas(urls)
        await self.scrape_loads()
        self._tasks.append(asyncio.create_task(self._scrape_loop(), name="vllm-replica-loads"))
        if self._discover is not None:
            self._tasks.append(asyncio.create_task(self._discovery_loop(), name="vllm-discovery"))

    async def stop(self) -> None:
        for task in [*self._tasks, *self._retiring]:
            task.cancel()
        async with self._changing:
            replicas, self._replicas = list(self._replicas.values()), {}
        await asyncio.gather(*(r.engine.stop() for r in replicas), return_exceptions=True)

    def replica_urls(self) -> list[str]:
        return sorted(self._replicas)

    async def set_replicas(self, urls: Iterable[str]) -> None:
        """Serve with exactly these replicas: start the new ones, retire the gone ones."""
        wanted = {normalized(u) for u in urls}
        async with self._changing:
            added = [Replica(url, self._make_engine(url), LoadTracker()) for url in sorted(wanted - set(self._replicas))]
            # Gone from routing at once; stopped once their requests in flight are done.
            removed = [self._replicas.pop(url) for url in sorted(set(self._replicas) - wanted)]
            results = await asyncio.gather(*(r.engine.start() for r in added), return_exceptions=True)
            for replica, result in zip(added, results):
                if isinstance(result, BaseException):
                    log.error("vLLM replica %s did not start: %r", replica.url, result)
                    await replica.engine.stop()
                    continue
                self._replicas[replica.url] = replica
                log.info("vLLM replica %s added", replica.url)
        for replica in removed:
            log.info("vLLM replica %s removed", replica.url)
            task = asyncio.create_task(self._retire(replica), name=f"vllm-retire-{replica.url}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, replica: Replica) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.response_timeout_s
        while replica.load.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.5)
        await replica.engine.stop()

    async def _discovery_loop(self) -> None:
        assert self._discover is not None
        while True:
            await asyncio.sleep(self.config.discovery_interval_s)
            try:
                urls = await self._discover()
                if urls is not None:
                    await self.set_replicas(urls)
            except Exception:  # a bug here must not end discovery
                log.exception("vLLM replica discovery failed")

    # -- load

    async def scrape_loads(self) -> None:
        await asyncio.gather(*(self._scrape(r) for r in list(self._replicas.values())))

    async def _scrape(self, replica: Replica) -> None:
        epoch = replica.load.scrape_started()
        try:
            load = parse_vllm_load(await replica.engine.fetch_metrics())
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.debug("no /metrics from %s: %s", replica.url, exc)
            return  # its health probe decides whether it is down
        if load is not None:
            replica.load.scraped_at(epoch, load)

    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.scrape_loads()
            except Exception:
                log.exception("scraping vLLM replicas' load failed")

    def replica_states(self) -> list[ReplicaState]:
        return [ReplicaState(r.url, r.engine.is_ready(), r.load.load) for r in self._replicas.values()]

    # -- routing

    def plan(self, request: GenerationRequest) -> tuple[list[str], RoutingDecision]:
        """The ready replicas in the order to try them, and how the first was chosen."""
        loads = [ReplicaLoad(r.url, r.load.load) for r in self._replicas.values() if r.engine.is_ready()]
        key = request.adapter.engine_name if request.adapter is not None else None
        order = pick(key, loads, self.config.load_bound)
        if key is None:
            return order, "least_loaded"
        owner = preference_order(key, [r.replica for r in loads])[:1]
        return order, "affinity" if order[:1] == owner else "spill"

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        order, decision = self.plan(request)
        if order:
            self.observer.replica_routed(decision)
        failures: list[str] = []
        last: EngineUnavailable | None = None
        for url in order:
            replica = self._replicas.get(url)
            if replica is None or not replica.engine.is_ready():
                continue  # removed or gone down since the plan
            dispatch = replica.load.dispatched()
            stream = replica.engine.generate(request)
            try:
                try:
                    first = await stream.__anext__()
                except EngineUnavailable as exc:
                    self.observer.replica_request(url, "load_miss" if exc.reason == "adapter_load_miss" else "moved")
                    log.warning("vLLM replica %s could not take %s: %s", url, request.request_id, exc)
                    failures.append(f"{url}: {exc.reason}")
                    last = exc
                    continue
                except InvalidRequest:
                    self.observer.replica_request(url, "invalid")
                    raise
                except StopAsyncIteration:
                    raise EngineFailed(f"vLLM replica {url} returned an empty stream") from None
                self.observer.replica_request(url, "served")
                yield first
                async for event in stream:
                    yield event
                return
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()
                replica.load.finished(dispatch)
        if last is None:
            raise EngineUnavailable("not_ready", "no vLLM replica is ready")
        raise EngineUnavailable(last.reason, "; ".join(failures))

    # -- state

    def is_ready(self) -> bool:
        return any(r.engine.is_ready() for r in self._replicas.values())

    def retry_after_s(self) -> float | None:
        hints = [h for r in self._replicas.values() if (h := r.engine.retry_after_s()) is not None]
        return min(hints) if hints else (self.config.discovery_interval_s if not self._replicas else None)

    def status(self) -> EngineStatus:
        replicas = []
        ready = 0
        for replica in sorted(self._replicas.values(), key=lambda r: r.url):
            state = replica.engine.status()
            ready += state.ready
            replicas.append(
                {
                    "url": replica.url,
                    "ready": state.ready,
                    "detail": state.detail,
                    "circuit": state.extra.get("circuit"),
                    "load": replica.load.load,
                }
            )
        detail = f"{ready} of {len(replicas)} replicas ready" if replicas else "no vLLM replica known"
        extra: dict[str, object] = {"replicas": replicas, "load_bound": self.config.load_bound}
        if self._discovery_target:
            extra["discovery"] = self._discovery_target
        return EngineStatus(self.name, self.is_ready(), "" if ready == len(replicas) and replicas else detail, extra)

    def loaded_adapters(self) -> int:
        return sum(r.engine.loaded_adapters() for r in self._replicas.values())

    def loaded_adapter_names(self) -> frozenset[str]:
        return frozenset().union(*(r.engine.loaded_adapter_names() for r in self._replicas.values()))

    async def unload_adapter(self, engine_name: str) -> None:
        await asyncio.gather(*(r.engine.unload_adapter(engine_name) for r in list(self._replicas.values())))
