"""OpenAI request bodies, validated strictly: a wrong type is a 400, never coerced.

Fields OpenAI defines but the gateway cannot honour on every engine are listed in
UNSUPPORTED and rejected with a message, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from serving.engines.base import SamplingParams

MAX_STOP_SEQUENCES = 4

UNSUPPORTED: dict[str, str] = {
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported",
    "tools": "tool definitions are not supported; fine-tune an adapter for function calling",
    "tool_choice": "tool_choice is not supported",
    "functions": "functions are not supported",
    "function_call": "function_call is not supported",
    "parallel_tool_calls": "parallel_tool_calls is not supported",
    "response_format": "response_format is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "suffix": "suffix is not supported",
    "best_of": "best_of is not supported",
}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content}


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationBody(_Strict):
    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for SDK compatibility; not used for routing

    @field_validator("n")
    @classmethod
    def _single_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: the CPU engine generates one choice")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop_tuple(),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def effective_max_tokens(self) -> int | None:
        # OpenAI deprecates max_tokens for max_completion_tokens; the newer one wins.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_GenerationBody):
    prompt: Union[str, list[str]]
    # OpenAI's legacy completions default to 16 tokens.
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt is supported per request")
        text = prompt if isinstance(prompt, str) else prompt[0]
        if not text:
            raise ValueError("prompt must not be empty")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
