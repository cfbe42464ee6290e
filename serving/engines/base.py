"""The one interface every inference engine implements.

The gateway speaks OpenAI to clients; engines speak in `GenerationRequest` and yield
`TextDelta`s then one `Usage`. Formatting OpenAI responses stays in the API layer,
so every engine gets the same metrics, errors and fallback for free.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncGenerator, Literal, Protocol, Union


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Choices to generate; each engine's events carry their choice's index.
    n: int = 1
    # Log probabilities: None = off, k >= 0 = the sampled token's and the k most likely.
    logprobs: int | None = None
    # (token id, bias) added to the logits, OpenAI's logit_bias (-100 bans, 100 forces).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # A grammar in xgrammar's EBNF (tuneserve/tool_calls/grammar.py) the output must
    # match: every engine constrains decoding with the same text.
    grammar: str | None = None


@dataclass(frozen=True)
class AdapterRef:
    """A tenant's LoRA adapter as the engines see it.

    `engine_name` is versioned (tenant--name--vN): a new version is a new name, so no
    engine can serve it from state (weights, prefix cache) left by the old one.
    """

    engine_name: str
    peft_path: Path
    gguf_path: Path
    tenant: str
    name: str


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    kind: Literal["chat", "completion"]
    params: SamplingParams
    messages: tuple[dict[str, Any], ...] = ()
    # For chat templates that render tools themselves (tool_calls/formats.py).
    tools: tuple[dict[str, Any], ...] = ()
    prompt: str = ""
    adapter: AdapterRef | None = None
    # Whether the client streams. An engine may serve a non-streamed request whole,
    # which is cheaper than streaming it and collecting the pieces.
    stream: bool = True


class AdapterObserver(Protocol):
    """Receives adapter load and eviction events (metrics)."""

    def adapter_loaded(self, backend: str, seconds: float) -> None: ...

    def adapter_evicted(self, backend: str) -> None: ...


class NullAdapterObserver:
    def adapter_loaded(self, backend: str, seconds: float) -> None:
        pass

    def adapter_evicted(self, backend: str) -> None:
        pass


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability and its most likely alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    # Set on the last delta of a choice: "stop" or "length".
    finish_reason: str | None = None
    # The choice (0..n-1) this text belongs to.
    choice: int = 0
    # One entry per token of `text`, when the request asked for logprobs.
    logprobs: tuple[TokenLogprob, ...] = ()
    # Tokens this delta stands for (an engine may merge tokens into one delta).
    tokens: int = 1
    # False when the engine delivered a whole answer at once: its arrival time says
    # nothing about time to first token or inter-token latency.
    timed: bool = True


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


GenerationEvent = Union[TextDelta, Usage]


@dataclass
class EngineStatus:
    name: str
    ready: bool
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(abc.ABC):
    """An inference backend. `name` is a bounded metrics label."""

    name: str

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources; may return before the engine is ready."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release resources and cancel work in flight."""

    @abc.abstractmethod
    def is_ready(self) -> bool:
        """Whether a request sent now is expected to be served."""

    @abc.abstractmethod
    def status(self) -> EngineStatus: ...

    def queue_depth(self) -> int:
        return 0

    def queue_capacity(self) -> int:
        """Requests the engine's own queue holds before rejecting; 0 when it has none."""
        return 0

    def loaded_adapters(self) -> int:
        return 0

    def retry_after_s(self) -> float | None:
        """When the engine may take requests again while it cannot (a 503's Retry-After);
        None when it cannot tell."""
        return None

    def loaded_adapter_names(self) -> frozenset[str]:
        """Engine names of the adapters the engine holds, less those already unloaded."""
        return frozenset()

    async def unload_adapter(self, engine_name: str) -> None:  # noqa: B027 - optional hook
        """Drop an adapter (deleted or replaced) from the engine's caches."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Yield TextDelta events, then exactly one Usage (all choices together).

        The Usage ends the answer: a consumer sends it on before asking for more, and
        the engine may still tidy up (drain a connection) until the iterator ends.
        Raises `EngineUnavailable` before the first event when the request can go to
        another engine; any error after the first event is final for this request.
        Closing the iterator early cancels the generation.
        """
