"""Tenants' adapters registered in vLLM on first use, LRU-bounded, one load at a time each.

vLLM loads runtime LoRAs through `POST /v1/load_lora_adapter` (needs
VLLM_ALLOW_RUNTIME_LORA_UPDATING). The registry of names there grows without bound, so
the gateway keeps at most `capacity` (vLLM's --max-cpu-loras) registered and unloads
the least recently used idle one to make room. Adapters with requests in flight are
never unloaded.

That LRU is this gateway's alone: with several gateways on one vLLM, one unloads what
another serves. `adapter_loading: resolver` is for that case: vLLM resolves a versioned
name itself on its first request (vllm_plugin/lora_resolver.py, from the shared adapter
volume) and its own LRU evicts, so the gateway neither loads nor unloads anything here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Callable, Literal

import aiohttp

from serving.engines.base import AdapterObserver, AdapterRef
from serving.errors import EngineUnavailable

log = logging.getLogger(__name__)

BACKEND = "vllm"
AdapterLoading = Literal["gateway", "resolver"]


class VLLMAdapterManager:
    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        capacity: int,
        observer: AdapterObserver,
        loading: AdapterLoading = "gateway",
    ) -> None:
        self._session = session
        self.capacity = capacity
        self.observer = observer
        self.loading = loading
        # gateway: loaded name -> requests in flight. resolver: names with requests in
        # flight only (what vLLM holds besides is vLLM's to know).
        self._in_use: OrderedDict[str, int] = OrderedDict()
        self._loading: dict[str, asyncio.Future[None]] = {}

    @property
    def resolving(self) -> bool:
        return self.loading == "resolver"

    def loaded(self) -> int:
        """Adapters known to be loaded in vLLM: with the resolver, those this gateway has
        requests in flight for (a lower bound; vLLM's vllm:lora_requests_info says more)."""
        return len(self._in_use)

    def names(self) -> frozenset[str]:
        """What this gateway may unload: with the resolver, nothing (another gateway may
        be serving any of them), so the reconciler leaves vLLM alone."""
        return frozenset() if self.resolving else frozenset(self._in_use)

    def reset(self) -> None:
        """vLLM restarted: nothing is registered there any more."""
        if not self.resolving:  # resolver: only requests in flight are counted, still in flight
            self._in_use.clear()

    async def acquire(self, adapter: AdapterRef) -> None:
        """Make sure `adapter` is registered and mark one request as using it."""
        name = adapter.engine_name
        if self.resolving:
            # vLLM resolves the name on this request; nothing to load, nothing to evict.
            self._in_use[name] = self._in_use.get(name, 0) + 1
            return
        while name not in self._in_use:
            pending = self._loading.get(name)
            if pending is not None:
                # Single flight: concurrent first requests wait for the one load.
                await asyncio.shield(pending)
                continue
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._loading[name] = future
            try:
                await self._make_room()
                await self._load(adapter)
                self._in_use[name] = 0
                future.set_result(None)
            except BaseException as exc:
                future.set_exception(exc if isinstance(exc, Exception) else EngineUnavailable("cancelled"))
                future.exception()  # retrieved: waiters re-raise it, nobody else must
                raise
            finally:
                del self._loading[name]
        self._in_use[name] += 1
        self._in_use.move_to_end(name)

    def release(self, adapter: AdapterRef) -> None:
        name = adapter.engine_name
        if name in self._in_use:
            # Clamped: a request that acquired before a forget() may release after the
            # name was loaded again; a negative count would never look idle.
            self._in_use[name] = max(0, self._in_use[name] - 1)
            if self.resolving and self._in_use[name] == 0:
                del self._in_use[name]

    def forget(self, name: str) -> None:
        """vLLM answered 404 for `name`: it is not registered there (another gateway
        unloaded it, or vLLM restarted between probes), so the next request loads it
        again. Requests in flight for it release harmlessly."""
        if not self.resolving:
            self._in_use.pop(name, None)

    async def _load(self, adapter: AdapterRef) -> None:
        start = time.perf_counter()
        body = {"lora_name": adapter.engine_name, "lora_path": str(adapter.peft_path)}
        try:
            async with self._session().post("/v1/load_lora_adapter", json=body) as response:
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise EngineUnavailable("connect_error", f"loading adapter: {type(exc).__name__}") from exc
        if response.status != 200 and "already" not in text:
            # vLLM refused it (rank above --max-lora-rank, ...): llama.cpp can still serve it.
            raise EngineUnavailable("adapter_load_failed", f"{response.status}: {text[:300]}")
        self.observer.adapter_loaded(BACKEND, time.perf_counter() - start)

    async def _make_room(self) -> None:
        while len(self._in_use) >= self.capacity:
            idle = next((n for n, count in self._in_use.items() if count == 0), None)
            if idle is None:
                log.warning("all %d vLLM adapters are busy; loading one more", len(self._in_use))
                return
            await self.unload(idle)
            self.observer.adapter_evicted(BACKEND)

    async def unload(self, name: str) -> None:
        if self.resolving:
            # Never: the name is unique per version, so nothing can be served stale, and
            # vLLM's LRU frees its memory; an unload could hit another gateway's request.
            return
        if self._in_use.pop(name, None) is None:
            return
        try:
            async with self._session().post("/v1/unload_lora_adapter", json={"lora_name": name}) as response:
                if response.status != 200:
                    log.warning("vLLM refused to unload %s: %s", name, (await response.text())[:200])
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("could not unload %s from vLLM: %s", name, exc)
