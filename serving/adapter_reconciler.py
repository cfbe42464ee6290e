"""Unload from the engines what the adapter registry no longer serves.

The gateway's own deletes and uploads unload at once (serving/api/adapter_routes.py).
Changes made elsewhere cannot: `tuneserve tenants delete` and `tuneserve adapters
remove` run in another process, and a request that resolved a version just before it
was replaced may load it after the replacement's unload. Such adapters can never be
addressed again (engine names are unique per stored version), but they hold engine
memory and slots, and a deleted tenant's weights should not outlive it. So every
`adapters.reconcile_interval_s` the gateway compares what each engine holds with what
the registry serves now, and unloads the difference.

Only from what the gateway itself manages: with `engines.vllm.adapter_loading: resolver`
a vLLM engine reports no adapters to unload (VLLMAdapterManager.names), since several
gateways share it and none may unload what another serves. There a removed version
leaves vLLM's memory through vLLM's own LRU, and the resolver never resolves it again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from serving.engines.base import Engine
from tuneserve.adapters.registry import AdapterRegistry, owner_of

log = logging.getLogger(__name__)


def _stale(registry: AdapterRegistry, names: frozenset[str]) -> list[str]:
    stale = []
    for engine_name in sorted(names):
        owner = owner_of(engine_name)
        current = registry.get(*owner) if owner else None
        if current is None or current.engine_name != engine_name:
            stale.append(engine_name)
    return stale


async def reconcile_once(registry: AdapterRegistry, engines: Sequence[Engine]) -> list[str]:
    """Unload every adapter an engine holds that is not a current registry version;
    return their engine names."""
    unloaded = []
    for engine in engines:
        # One registry read per held adapter: engines hold at most their LoRA slots.
        for engine_name in await asyncio.to_thread(_stale, registry, engine.loaded_adapter_names()):
            await engine.unload_adapter(engine_name)
            unloaded.append(engine_name)
    if unloaded:
        log.info("unloaded %d adapter(s) the registry no longer serves: %s", len(unloaded), unloaded)
    # With the registry's index in the database, versions removed through another
    # gateway leave their files on this machine's disk until this sweep.
    swept = await asyncio.to_thread(registry.sweep_local)
    if swept:
        log.info("removed %d version dir(s) the registry no longer stores", len(swept))
    return unloaded


async def reconcile_forever(registry: AdapterRegistry, engines: Sequence[Engine], interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await reconcile_once(registry, engines)
        except Exception:  # a busy disk or an engine mid-restart: the next round retries
            log.warning("adapter reconciliation failed", exc_info=True)
