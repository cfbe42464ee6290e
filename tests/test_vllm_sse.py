"""Reading vLLM's SSE body: where the answer ends, fed with the bytes vLLM sends."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol

from serving.engines.base import TextDelta, Usage
from serving.engines.vllm import sse_events
from serving.errors import EngineFailed

HEAD = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps({**HEAD, **payload}).encode() + b"\n\n"


TEXT = event({"choices": [{"index": 0, "text": " there", "finish_reason": "length"}], "usage": None})
USAGE = event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


class OpenConnection(BaseProtocol):
    """The reader's side of a live connection; bytes arrive through `feed_data`."""

    @property
    def connected(self) -> bool:
        return True


def body_reader() -> aiohttp.StreamReader:
    loop = asyncio.get_running_loop()
    return aiohttp.StreamReader(OpenConnection(loop), 2**16, loop=loop)


def test_the_answer_ends_at_the_usage_event_before_vllm_ends_its_body() -> None:
    """The client's stream ends as soon as vLLM's usage arrives; `[DONE]` and the end of
    the body are read after it, to return the connection to the pool."""

    async def scenario() -> None:
        content = body_reader()
        events = sse_events(content, "completion")
        content.feed_data(TEXT + USAGE)  # vLLM has not sent [DONE] nor ended the body
        got = [await asyncio.wait_for(events.__anext__(), 2) for _ in range(3)]
        assert got == [TextDelta(" there"), TextDelta("", finish_reason="length", tokens=0), Usage(3, 1)]
        tidy_up = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.05)
        assert not tidy_up.done()  # still reading the rest of the body
        content.feed_data(b"data: [DONE]\n\n")
        content.feed_eof()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(tidy_up, 2)
        assert content.at_eof()

    asyncio.run(scenario())


def test_a_body_that_ends_before_its_usage_is_a_failure_after_text() -> None:
    async def scenario() -> None:
        content = body_reader()
        content.feed_data(TEXT)
        content.feed_eof()
        events = sse_events(content, "completion")
        assert await events.__anext__() == TextDelta(" there")
        with pytest.raises(EngineFailed, match="ended early"):
            await events.__anext__()

    asyncio.run(scenario())
