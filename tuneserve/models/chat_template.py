"""Chat prompts rendered from the model's own chat template.

vLLM renders chat requests with the HF tokenizer's template; llama.cpp gets the text
rendered here, with the same Jinja settings transformers uses, so one request gives
the same prompt tokens on both engines (tests/test_vllm_gateway.py checks it).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tuneserve.errors import TuneserveError


class ChatTemplateError(TuneserveError):
    pass


def _token_text(value: Any) -> str:
    # tokenizer_config.json stores special tokens as a string or an AddedToken dict.
    if isinstance(value, Mapping):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)


class ChatTemplate:
    def __init__(self, template: str, special_tokens: Mapping[str, str]) -> None:
        self.source = template
        self.special_tokens = dict(special_tokens)

    @classmethod
    def from_hf_dir(cls, path: Path) -> "ChatTemplate":
        config_file = path / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ChatTemplateError(f"cannot read {config_file}: {exc}") from exc
        template = config.get("chat_template")
        jinja_file = path / "chat_template.jinja"
        if not template and jinja_file.is_file():
            template = jinja_file.read_text()
        if not template:
            raise ChatTemplateError(f"{path} has no chat template")
        specials = {
            key: _token_text(config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        return cls(template, specials)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, str], tokens: Sequence[str]) -> "ChatTemplate":
        template = metadata.get("tokenizer.chat_template")
        if not template:
            raise ChatTemplateError("the GGUF file carries no tokenizer.chat_template")

        def token(key: str) -> str:
            index = metadata.get(key)
            return tokens[int(index)] if index is not None and int(index) < len(tokens) else ""

        return cls(
            template,
            {
                "bos_token": token("tokenizer.ggml.bos_token_id"),
                "eos_token": token("tokenizer.ggml.eos_token_id"),
            },
        )

    @cached_property
    def _compiled(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        # `tools` only for templates that render them (tool_calls/formats.py); like
        # transformers, an absent list is None, not [], so `{% if tools %}` stays false.
        try:
            return self._compiled.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                tools=list(tools) if tools else None,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:
            # Templates use raise_exception for conversations they refuse (role order...).
            raise ChatTemplateError(str(exc)) from exc
