"""How many adapter uploads a gateway takes at once: per uploader, and in processing.

An upload holds a disk spool of up to adapters.max_bytes while it arrives and, while
it is validated and converted, about one float32 copy of its weights in memory. Two
bounds, for the two costs:
- per uploader (a tenant, or the admin), counted from before the body is read until
  the answer: more is refused with 429 at once, before anything is read (and the
  connection is closed: the unread body would otherwise be taken for the next
  request). So one tenant cannot hold more than its share of spools.
- in processing, all uploaders together: an upload whose body has arrived waits for
  one of `adapters.max_concurrent_uploads` places before it is validated. Bodies still
  arriving do not hold these places, so clients that trickle their uploads in cannot
  starve the others (server.max_pending_bodies and adapters.upload_timeout_s bound them).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import AsyncIterator, Iterator

from serving.api.body_gate import close_connection
from serving.errors import TooManyUploads


class UploadSlots:
    def __init__(self, processing: int, per_uploader: int) -> None:
        self.per_uploader = per_uploader
        self._processing = asyncio.Semaphore(processing)
        self._held: Counter[str] = Counter()

    @contextlib.contextmanager
    def uploader(self, uploader: str) -> Iterator[None]:
        # Only the event loop thread calls this, so the check and the increment are atomic.
        if self._held[uploader] >= self.per_uploader:
            raise close_connection(TooManyUploads(
                f"You already have {self._held[uploader]} adapter upload(s) in progress "
                f"(adapters.max_concurrent_uploads_per_tenant = {self.per_uploader}); "
                "retry when it has finished."
            ))
        self._held[uploader] += 1
        try:
            yield
        finally:
            self._held[uploader] -= 1
            if not self._held[uploader]:
                del self._held[uploader]

    @contextlib.asynccontextmanager
    async def processing(self) -> AsyncIterator[None]:
        async with self._processing:
            yield
