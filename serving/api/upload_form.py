"""Reading an adapter upload's multipart body, counted while it arrives.

Starlette's `request.form()` spools a file part to the system temp dir before anyone
can count it, so a chunked upload (no Content-Length) was taken whole whatever the
cap. Here the body is parsed as it streams in: the file part goes straight to a temp
file in the gateway's own upload dir, and the read stops at the first byte over the
cap with a 413. The temp file is removed on every way out, so a refused or broken
upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, AsyncIterator, Callable
from urllib.parse import parse_qsl

import python_multipart
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from serving.api.body_gate import body_gate, close_connection
from serving.errors import InvalidRequest, PayloadTooLarge

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELDS = 8
MAX_FIELD_BYTES = 4096
# Multipart headers of one part; a client cannot make us hold more than this.
_MAX_HEADER_BYTES = 16 * 1024
MULTIPART_ENVELOPE = 64 * 1024  # boundaries, part headers and the small fields


@dataclass
class UploadForm:
    fields: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # the archive, in the upload dir; removed when the form closes
    file_bytes: int = 0


@dataclass
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    is_file: bool = False
    value: bytearray = field(default_factory=bytearray)


class _Parser:
    """python-multipart's callbacks, turned into fields and one spooled file."""

    def __init__(self, form: UploadForm, spool: Callable[[], IO[bytes]], max_file_bytes: int) -> None:
        self.form, self.spool, self.max_file_bytes = form, spool, max_file_bytes
        self.part = _Part()
        self.header_field = bytearray()
        self.header_value = bytearray()
        self.header_bytes = 0
        self.out: IO[bytes] | None = None
        self.pending: list[bytes] = []  # file data of the current chunk, written off the loop
        self.ended = False  # the closing boundary was seen

    def callbacks(self) -> "MultipartCallbacks":
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._header(self.header_field, data[start:end]),
            "on_header_value": lambda data, start, end: self._header(self.header_value, data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_end": self._body_end,
        }

    def _body_end(self) -> None:
        self.ended = True

    def _begin(self) -> None:
        self.part = _Part()
        self.header_bytes = 0

    def _header(self, into: bytearray, data: bytes) -> None:
        self.header_bytes += len(data)
        if self.header_bytes > _MAX_HEADER_BYTES:
            raise InvalidRequest("A multipart part has headers over 16 KiB.")
        into.extend(data)

    def _header_end(self) -> None:
        self.part.headers.append((bytes(self.header_field).lower(), bytes(self.header_value)))
        self.header_field.clear()
        self.header_value.clear()

    def _headers_finished(self) -> None:
        disposition = dict(self.part.headers).get(b"content-disposition")
        if disposition is None:
            raise InvalidRequest("A multipart part has no Content-Disposition header.")
        _, options = parse_options_header(disposition)
        name = options.get(b"name", b"").decode("latin-1")
        self.part.name = name
        self.part.is_file = b"filename" in options
        if name in self.form.fields or (self.part.is_file and self.form.file is not None):
            raise InvalidRequest(f"The field '{name}' is given twice.", param=name or None)
        if len(self.form.fields) >= MAX_FIELDS:
            raise InvalidRequest(f"Too many form fields (at most {MAX_FIELDS}).")
        if self.part.is_file:
            if name != "file":
                raise InvalidRequest(f"Unexpected file field '{name}'; send the adapter as 'file'.", param=name)
            self.out = self.spool()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self.part.is_file:
            self.form.file_bytes += end - start
            if self.form.file_bytes > self.max_file_bytes:
                raise PayloadTooLarge(
                    f"The adapter archive exceeds the limit of {self.max_file_bytes} bytes "
                    "(adapters.max_bytes).",
                    param="file",
                )
            self.pending.append(data[start:end])
            return
        self.part.value.extend(data[start:end])
        if len(self.part.value) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"The field '{self.part.name}' is over {MAX_FIELD_BYTES} bytes.", param=self.part.name)

    def _end(self) -> None:
        if not self.part.is_file:
            try:
                self.form.fields[self.part.name] = self.part.value.decode()
            except UnicodeDecodeError:
                raise InvalidRequest(f"The field '{self.part.name}' is not UTF-8.", param=self.part.name) from None

    async def flush(self) -> None:
        if self.pending and self.out is not None:
            data, self.pending = b"".join(self.pending), []
            await asyncio.to_thread(self.out.write, data)


@contextlib.asynccontextmanager
async def read_upload_form(
    request: Request, form: UploadForm, *, max_file_bytes: int, spool_dir: Path, timeout_s: float
) -> AsyncIterator[UploadForm]:
    """Fill `form` with the upload's fields and its spooled `file`, which is removed
    when the block ends. `form` is the caller's, so that what arrived before a refusal
    (the adapter's name) is there to audit.

    The body is read inside the gateway's body gate (body_gate.py): it holds one of
    the places for bodies in flight, must arrive within `timeout_s`, and a refusal
    while it is still arriving closes the connection. The block itself (validating
    and storing the adapter) runs after, outside the gate."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_file_bytes + MULTIPART_ENVELOPE:
        raise close_connection(PayloadTooLarge(
            f"Upload is {declared} bytes; the limit is {max_file_bytes} bytes (adapters.max_bytes).", param="file"
        ))
    spooled: list[IO[bytes]] = []

    def spool() -> IO[bytes]:
        out = tempfile.NamedTemporaryFile(dir=spool_dir, prefix="upload-", delete=False)
        spooled.append(out)
        form.file = Path(out.name)
        return out

    try:
        async with body_gate(request).reading(timeout_s=timeout_s):
            await _read(request, form, max_file_bytes, spool_dir, spool)
        for out in spooled:
            await asyncio.to_thread(out.flush)
        yield form
    finally:
        for out in spooled:
            out.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out.name)


async def _read(
    request: Request, form: UploadForm, max_file_bytes: int, spool_dir: Path, spool: Callable[[], IO[bytes]]
) -> None:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type == b"application/x-www-form-urlencoded":
        # How an admin sends only a server `path`: small fields, no file.
        await _read_urlencoded(request.stream(), form)
        return
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidRequest("Send the adapter as multipart/form-data with fields 'name' and 'file'.")
    spool_dir.mkdir(parents=True, exist_ok=True)
    parser = _Parser(form, spool, max_file_bytes)
    multipart = python_multipart.MultipartParser(boundary, parser.callbacks())
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_file_bytes + MULTIPART_ENVELOPE:  # whatever the parts claim
            raise PayloadTooLarge(f"Upload exceeds the limit of {max_file_bytes} bytes.", param="file")
        _feed(multipart, chunk)
        await parser.flush()
    _finish(multipart)
    await parser.flush()
    if not parser.ended:
        raise InvalidRequest("The multipart body ended before its closing boundary.")


def _feed(multipart: Any, chunk: bytes) -> None:
    try:
        multipart.write(chunk)
    except python_multipart.exceptions.MultipartParseError as exc:
        raise InvalidRequest(f"The multipart body is malformed: {exc}") from None


def _finish(multipart: Any) -> None:
    try:
        multipart.finalize()
    except python_multipart.exceptions.MultipartParseError as exc:
        raise InvalidRequest(f"The multipart body is malformed: {exc}") from None


async def _read_urlencoded(chunks: AsyncIterator[bytes], form: UploadForm) -> UploadForm:
    body = bytearray()
    async for chunk in chunks:
        body.extend(chunk)
        if len(body) > MAX_FIELDS * MAX_FIELD_BYTES:
            raise PayloadTooLarge("The form is too large for a form without a file.")
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=MAX_FIELDS, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"The form body is malformed: {exc}") from None
    form.fields.update(pairs)
    return form
