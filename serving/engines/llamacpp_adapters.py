"""LoRA adapters on one llama.cpp context: load once, switch per request, LRU-evict.

Used only from the worker thread that owns the Llama, so it needs no locking; the
names it holds are published as an immutable snapshot for metrics.
"""

from __future__ import annotations

import ctypes
import time
from collections import OrderedDict
from typing import Any, Iterable

from serving.engines.base import AdapterObserver, AdapterRef
from serving.errors import EngineFailed

BACKEND = "llamacpp"


class LlamaAdapterCache:
    def __init__(self, llama: Any, capacity: int, observer: AdapterObserver) -> None:
        self.llama = llama
        self.capacity = capacity
        self.observer = observer
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self.active: str | None = None
        self.loaded_names: frozenset[str] = frozenset()

    def activate(self, adapter: AdapterRef | None) -> bool:
        """Put `adapter` (or none) on the context; True if that changed what is applied.

        The caller must then drop the KV/prompt cache: llama-cpp-python matches cached
        prompts by tokens only, and those tokens were computed under other weights.
        """
        import llama_cpp

        name = adapter.engine_name if adapter else None
        if name == self.active:
            if name is not None:
                self._handles.move_to_end(name)
            return False
        ctx = self.llama._ctx.ctx
        if adapter is None:
            rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            handle = self._handles.get(adapter.engine_name) or self._load(adapter)
            self._handles.move_to_end(adapter.engine_name)
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
            scales = (ctypes.c_float * 1)(1.0)
            rc = llama_cpp.llama_set_adapters_lora(ctx, handles, 1, scales)
        if rc != 0:
            raise EngineFailed(f"llama.cpp could not apply adapter {name} (rc={rc})")
        self.active = name
        self._evict()
        return True

    def _load(self, adapter: AdapterRef) -> Any:
        import llama_cpp

        if not adapter.gguf_path.is_file():
            raise EngineFailed(f"adapter {adapter.name}: GGUF LoRA file is missing")
        start = time.perf_counter()
        handle = llama_cpp.llama_adapter_lora_init(self.llama._model.model, str(adapter.gguf_path).encode())
        if not handle:
            raise EngineFailed(f"llama.cpp could not load adapter {adapter.name}")
        self.observer.adapter_loaded(BACKEND, time.perf_counter() - start)
        self._handles[adapter.engine_name] = handle
        self._publish()
        return handle

    def _evict(self) -> None:
        for name in list(self._handles):
            if len(self._handles) <= self.capacity:
                break
            if name != self.active:
                self._free(name)
                self.observer.adapter_evicted(BACKEND)

    def forget(self, names: Iterable[str]) -> None:
        """Free adapters that were deleted or replaced."""
        import llama_cpp

        for name in names:
            if name not in self._handles:
                continue
            if name == self.active:
                llama_cpp.llama_set_adapters_lora(self.llama._ctx.ctx, None, 0, None)
                self.active = None
            self._free(name)

    def _free(self, name: str) -> None:
        import llama_cpp

        llama_cpp.llama_adapter_lora_free(self._handles.pop(name))
        self._publish()

    def close(self) -> None:
        self.forget(list(self._handles))

    def _publish(self) -> None:
        self.loaded_names = frozenset(self._handles)
