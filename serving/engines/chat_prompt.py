"""A chat request's prompt text, rendered the one way both engines use."""

from __future__ import annotations

from serving.engines.base import GenerationRequest
from serving.errors import InvalidRequest
from tuneserve.models.chat_template import ChatTemplate, ChatTemplateError


def render_chat(template: ChatTemplate, request: GenerationRequest) -> str:
    """Its messages and, for templates that render them, its tools (`request.tools`)."""
    try:
        return template.render(request.messages, tools=request.tools or None)
    except ChatTemplateError as exc:
        raise InvalidRequest(f"messages rejected by the chat template: {exc}", param="messages") from exc
