"""Embedded llama.cpp engine (CPU) on llama-cpp-python.

A `Llama` is not thread-safe, so each instance is owned by one worker thread that
takes jobs from a shared queue. The asyncio side bounds that queue (429 past it) and
receives events through `call_soon_threadsafe`. Closing the event iterator (client
gone, timeout) sets the job's cancel flag, which the worker checks between tokens.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncGenerator

from serving.engines.base import (
    AdapterObserver,
    Engine,
    EngineStatus,
    GenerationEvent,
    GenerationRequest,
    NullAdapterObserver,
    TextDelta,
    TokenLogprob,
    Usage,
)
from serving.engines.chat_prompt import render_chat
from serving.engines.llamacpp_adapters import LlamaAdapterCache
from serving.engines.llamacpp_grammar import GrammarSupport, Vocabulary, token_piece
from serving.engines.llamacpp_sampling import StepShaper
from serving.errors import ApiError, EngineFailed, InvalidRequest, QueueFull
from tuneserve.gguf.llama_loader import ExtraBufferTypes, file_type_name, llama_runtime, load_llama
from tuneserve.models.chat_template import ChatTemplate

log = logging.getLogger(__name__)

_DONE = object()
_RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: draw a fresh seed.
# Job service times are averaged exponentially (recent jobs count most); before the
# first job ends, a second is the guess.
_SERVICE_WEIGHT = 0.2
_UNKNOWN_SERVICE_S = 1.0


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any]
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float | None = None  # time.monotonic() when a worker took it

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


def _evaluate_all_but_last(llama: Any, tokens: list[int]) -> None:
    """Bring the KV cache to exactly tokens[:-1], reusing what it already holds.

    llama.generate then evaluates the last prompt token alone, whatever the cache held.
    Otherwise it would sometimes be part of a prompt batch (cold) and sometimes replayed
    alone (a cache hit), and llama.cpp multiplies a batch and a single token with
    different kernels: on a quantized model, the same request at temperature 0 would
    answer differently depending on the request before it.
    """
    import numpy as np

    cached = llama._input_ids  # what the KV cache holds, llama-cpp-python's own record
    wanted = len(tokens) - 1
    common = min(len(cached), wanted)
    differ = np.flatnonzero(cached[:common] != np.asarray(tokens[:common], dtype=cached.dtype))
    prefix = int(differ[0]) if differ.size else common
    if prefix < wanted:
        llama.n_tokens = prefix  # eval() drops the cache past n_tokens before decoding
        llama.eval(tokens[prefix:-1])


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a possible prefix."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def prompt_tokens(llama: Any, template: ChatTemplate, request: GenerationRequest) -> list[int]:
    """Token ids of a request's prompt, as vLLM would compute them for the same request."""
    if request.kind == "chat":
        # The template writes special tokens itself; vLLM's chat path adds none either.
        return llama.tokenize(render_chat(template, request).encode(), add_bos=False, special=True)
    return llama.tokenize(request.prompt.encode(), add_bos=True, special=True)


class _Worker:
    """One Llama and the thread that owns it."""

    def __init__(
        self,
        index: int,
        llama: Any,
        template: ChatTemplate,
        jobs: "queue.Queue[Any]",
        adapters: LlamaAdapterCache,
        forgotten: "ForgetList",
        grammars: GrammarSupport,
    ) -> None:
        self.index = index
        self.busy = False
        self.adapters = adapters
        self.forgotten = forgotten
        self.grammars = grammars
        self._forgotten_seen = 0
        self.llama = llama
        self.template = template
        self.jobs = jobs
        self.thread = threading.Thread(target=self._run, name=f"llamacpp-{index}", daemon=True)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                self.adapters.close()
                return
            self._free_forgotten_adapters()
            if job.cancelled.is_set():
                job.emit(_DONE)
                continue
            self.busy = True
            job.started = time.monotonic()
            try:
                self._generate(job)
            except ApiError as exc:
                job.emit(exc)
            except Exception as exc:  # reported to the waiting request, worker lives on
                log.exception("llama.cpp generation failed for %s", job.request.request_id)
                job.emit(EngineFailed(f"llama.cpp failed: {type(exc).__name__}: {exc}"))
            finally:
                self.busy = False
                job.emit(_DONE)

    def _free_forgotten_adapters(self) -> None:
        names, self._forgotten_seen = self.forgotten.since(self._forgotten_seen)
        if names:
            self.adapters.forget(names)

    def _generate(self, job: _Job) -> None:
        llama = self.llama
        request = job.request
        params = request.params
        if self.adapters.activate(request.adapter):
            llama.reset()
        tokens = prompt_tokens(llama, self.template, request)
        n_ctx = llama.n_ctx()
        if not tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if len(tokens) >= n_ctx:
            raise InvalidRequest(
                f"This model's maximum context length is {n_ctx} tokens. However, your "
                f"request has {len(tokens)} prompt tokens.",
                param="messages" if request.kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        budget = n_ctx - len(tokens)
        if params.max_tokens is not None and params.max_tokens > budget:
            raise InvalidRequest(
                f"This model's maximum context length is {n_ctx} tokens. However, you "
                f"requested {len(tokens) + params.max_tokens} tokens ({len(tokens)} in the "
                f"prompt, {params.max_tokens} for the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        n_vocab = llama.n_vocab()
        for token, _ in params.logit_bias:
            if not 0 <= token < n_vocab:
                raise InvalidRequest(f"logit_bias names token {token}, outside the vocabulary (0..{n_vocab - 1})", param="logit_bias")
        grammar = params.grammar
        grammars = self.grammars.cache(llama) if grammar is not None else None
        if grammars is not None and grammar is not None:
            grammars.get(grammar)  # compiled before any output: a bad grammar is a 400
        vocabulary = self.grammars.vocabulary(llama) if params.logprobs is not None else None
        max_tokens = params.max_tokens or budget
        completion = 0
        # n choices one after another; each replays only the prompt's last token.
        for index in range(params.n):
            shaper = None
            if grammars is not None or params.logit_bias or params.logprobs is not None:
                constraint = grammars.constraint(grammar) if grammars is not None and grammar is not None else None
                shaper = StepShaper(constraint, params.logit_bias, params.logprobs)
            seed = None if params.seed is None else params.seed + index
            done = self._choice(job, tokens, index, seed, max_tokens, shaper, vocabulary)
            if done is None:
                return  # cancelled: the request is gone, nothing more to send
            completion += done
        job.emit(Usage(prompt_tokens=len(tokens), completion_tokens=completion))

    def _choice(
        self,
        job: _Job,
        tokens: list[int],
        index: int,
        seed: int | None,
        max_tokens: int,
        shaper: StepShaper | None,
        vocabulary: Vocabulary | None,
    ) -> int | None:
        """Generate one choice; its completion tokens, or None when cancelled."""
        import llama_cpp

        llama = self.llama
        params = job.request.params
        _evaluate_all_but_last(llama, tokens)
        llama.set_seed(_RANDOM_SEED if seed is None else seed & 0xFFFFFFFF)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        constraint = shaper.constraint if shaper is not None else None
        vocab = llama._model.vocab
        completion = 0
        finish = "length"
        hit_stop = False
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text is held back
        unsent = 0  # tokens since the last delta
        # Sampling chain matched to vLLM's defaults: no top-k, min-p or repeat penalty.
        for token in llama.generate(
            tokens,
            top_k=0,
            top_p=params.top_p,
            min_p=0.0,
            temp=params.temperature,
            repeat_penalty=1.0,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logits_processor=[shaper] if shaper is not None else None,
        ):
            if job.cancelled.is_set():
                return None
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            if constraint is not None and not constraint.accept(token):
                # Cannot happen with the mask applied; end the choice rather than go off-grammar.
                log.warning("grammar rejected sampled token %d in %s", token, job.request.request_id)
                finish = "stop"
                break
            completion += 1
            unsent += 1
            if shaper is not None and vocabulary is not None:
                pending.append(shaper.logprob(token, vocabulary))
            text, hit = stops.feed(decoder.decode(token_piece(vocab, token, special=False)))
            if text:
                job.emit(TextDelta(text, choice=index, logprobs=tuple(pending), tokens=unsent))
                pending, unsent = [], 0
            if hit:
                finish, hit_stop = "stop", True
                break
            if constraint is not None and constraint.is_terminated():
                finish = "stop"
                break
            if completion >= max_tokens:
                break
        tail = "" if hit_stop else stops.flush() + decoder.decode(b"", final=True)
        job.emit(TextDelta(tail, finish_reason=finish, choice=index, logprobs=tuple(pending), tokens=unsent))
        return completion


class ForgetList:
    """Append-only list of unloaded adapter names; each worker reads what it has not seen."""

    def __init__(self) -> None:
        self._names: list[str] = []
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self._names.append(name)

    def since(self, seen: int) -> tuple[list[str], int]:
        with self._lock:
            return self._names[seen:], len(self._names)


class LlamaCppEngine(Engine):
    name = "llamacpp"

    def __init__(
        self,
        gguf_path: Path,
        n_ctx: int,
        workers: int = 1,
        n_threads: int | None = None,
        n_batch: int = 512,
        queue_size: int = 64,
        template: ChatTemplate | None = None,
        max_loras: int = 8,
        observer: AdapterObserver | None = None,
        extra_buffer_types: ExtraBufferTypes = "auto",
    ) -> None:
        self.gguf_path = gguf_path
        self.extra_buffer_types = extra_buffer_types
        self._runtime: dict[str, Any] = {}
        self.n_ctx = n_ctx
        self.n_workers = workers
        self.n_threads = n_threads or max(1, (os.cpu_count() or 1) // workers)
        self.n_batch = n_batch
        self.queue_size = queue_size
        self.template = template
        self.max_loras = max_loras
        self.observer = observer or NullAdapterObserver()
        self._forgotten = ForgetList()
        self._forgotten_names: set[str] = set()  # what _forgotten holds, to add each once
        # The vocabulary and compiled output grammars: one GGUF, shared by the workers.
        self._grammars = GrammarSupport()
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._workers: list[_Worker] = []
        self._in_engine = 0
        self._mean_service_s: float | None = None
        self._error: str = ""

    def _load(self) -> Any:
        return load_llama(
            self.gguf_path,
            extra_buffer_types=self.extra_buffer_types,
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_batch=self.n_batch,
        )

    async def start(self) -> None:
        if not self.gguf_path.is_file():
            self._error = f"GGUF file not found: {self.gguf_path}"
            raise FileNotFoundError(self._error)
        for index in range(self.n_workers):
            llama = await asyncio.to_thread(self._load)
            if not self._runtime:
                # Which path this host takes, for /ready: the CPU features llama.cpp's
                # kernels use, the GGUF's type and the extra-buffer choice.
                file_type = file_type_name(int(llama.metadata.get("general.file_type", -1)))
                self._runtime = {"gguf_type": file_type, **llama_runtime(self.extra_buffer_types).summary()}
            if self.template is None:
                tokens = [llama.detokenize([i], special=True).decode("utf-8", "replace") for i in range(llama.n_vocab())]
                self.template = ChatTemplate.from_gguf_metadata(llama.metadata, tokens)
            adapters = LlamaAdapterCache(llama, self.max_loras, self.observer)
            worker = _Worker(index, llama, self.template, self._jobs, adapters, self._forgotten, self._grammars)
            worker.thread.start()
            self._workers.append(worker)
        log.info("llama.cpp ready: %s, %d worker(s) x %d threads", self.gguf_path, self.n_workers, self.n_threads)

    async def stop(self) -> None:
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            await asyncio.to_thread(worker.thread.join, 30)
        self._workers.clear()

    def is_ready(self) -> bool:
        return bool(self._workers)

    def status(self) -> EngineStatus:
        return EngineStatus(
            self.name,
            self.is_ready(),
            self._error,
            {
                "workers": len(self._workers),
                "busy_workers": sum(w.busy for w in self._workers),
                "queue_depth": self.queue_depth(),
                **self._runtime,
            },
        )

    def queue_depth(self) -> int:
        return max(0, self._in_engine - len(self._workers))

    def queue_capacity(self) -> int:
        return self.queue_size

    def _served(self, seconds: float) -> None:
        mean = self._mean_service_s
        self._mean_service_s = seconds if mean is None else mean + _SERVICE_WEIGHT * (seconds - mean)

    def drain_time_s(self) -> float:
        """About when the jobs queued now will all have started: a full queue's Retry-After.

        Not when the first slot frees: every client refused meanwhile would come back
        then, together, and find the queue full again.
        """
        service = self._mean_service_s if self._mean_service_s is not None else _UNKNOWN_SERVICE_S
        return self.queue_depth() * service / max(1, len(self._workers))

    def loaded_adapters(self) -> int:
        return len(self.loaded_adapter_names())

    def loaded_adapter_names(self) -> frozenset[str]:
        held: frozenset[str] = frozenset().union(*(w.adapters.loaded_names for w in self._workers))
        return held - self._forgotten_names

    async def unload_adapter(self, engine_name: str) -> None:
        # Workers free it before their next job; until then it only holds memory,
        # and versioned names mean no request can reach it again.
        if engine_name not in self._forgotten_names:
            self._forgotten_names.add(engine_name)
            self._forgotten.add(engine_name)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        if not self._workers:
            raise EngineFailed("the llama.cpp engine is not running")
        # _in_engine counts queued and running jobs; each worker runs one at a time.
        if self._in_engine >= self.queue_size + len(self._workers):
            raise QueueFull(
                f"The llama.cpp engine has {self.queue_depth()} requests queued; retry shortly.",
                retry_after_s=self.drain_time_s(),
            )
        loop = asyncio.get_running_loop()
        job = _Job(request, loop, asyncio.Queue())
        self._in_engine += 1
        self._jobs.put(job)
        done = False
        try:
            while True:
                item = await job.events.get()
                if item is _DONE:
                    done = True
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self._in_engine -= 1
            if done and job.started is not None:
                self._served(time.monotonic() - job.started)
            if not done:
                job.cancelled.set()
