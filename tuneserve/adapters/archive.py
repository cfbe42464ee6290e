"""Unpack an adapter upload (a dir, a .tar.gz or a .zip) into a private dir, safely.

Archives come from tenants, so members are never handed to `extractall`: each name is
checked (no absolute path, no `..`), only regular files and dirs are created (no links,
devices or FIFOs), only the files an adapter is made of are accepted (by name, at the
top level or in one top-level dir: `_Layout`), and sizes and counts are enforced while
extracting, so a zip or gzip bomb stops at the cap instead of filling the disk. The
format is recognised by its magic bytes, not its file name: an HTTP upload arrives as
a temp file. A rejection names the member as the tenant wrote it, never a path of
this server.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, Iterator, Protocol

from tuneserve.adapters.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tuneserve.adapters.validation import AdapterRejected, check_member, quote, unexpected
from tuneserve.errors import TuneserveError
from tuneserve.fsutil import OWNER_FILE

_CHUNK = 1 << 20
# Tar headers, padding and PAX records count against the decompressed stream too: a
# bomb can hide in a huge PAX header, which tarfile reads into memory in one go.
_TAR_OVERHEAD_PER_ENTRY = 8 * 1024
_TAR_OVERHEAD = 1 << 20
_MAX_TAR_HEADER = 64 * 1024  # one PAX record or GNU long name: real ones are < 1 KiB
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}
_NAME_MAX = 255  # bytes in one path component, on Linux filesystems
# What macOS Finder adds to the zips it makes (resource forks): skipped, never extracted.
_MAC_METADATA = "__MACOSX"


class _Budget:
    """Running totals of one upload against adapters.max_files and adapters.max_bytes."""

    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files
        self.bytes = self.entries = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.max_files:
            raise self.too_many()

    def too_many(self) -> AdapterRejected:
        return AdapterRejected(
            "too_many_files",
            f"the upload has more than {self.max_files} files and directories "
            "(adapters.max_files); upload only the adapter's own files",
        )

    def too_large(self) -> AdapterRejected:
        return AdapterRejected(
            "too_large",
            f"the adapter is larger than {self.max_bytes} bytes unpacked (adapters.max_bytes); "
            f"upload only {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, or lower the rank",
        )

    def expect(self, size: int) -> None:
        """Refuse up front on a declared size, before reading anything."""
        if self.bytes + size > self.max_bytes:
            raise self.too_large()

    def consume(self, size: int) -> None:
        self.bytes += size
        if self.bytes > self.max_bytes:
            raise self.too_large()


def unpack(source: Path, dest: Path, *, max_bytes: int, max_files: int) -> None:
    """Copy the adapter dir `source`, or extract the .tar.gz/.zip `source`, into `dest`.

    `dest` must be an empty dir that nothing else writes to. On AdapterRejected, `dest`
    may hold part of the upload; the caller removes it.
    """
    budget, layout = _Budget(max_bytes, max_files), _Layout()
    try:
        if source.is_dir():
            _copy_dir(source, dest, budget, layout)
            return
        if not source.is_file():
            what = "does not exist" if not source.exists() else "is not a file or directory"
            raise AdapterRejected("invalid_source", f"{quote(source)} {what}")
        size = source.stat().st_size
        if size > max_bytes:
            raise AdapterRejected(
                "too_large",
                f"the archive is {size} bytes, more than an adapter may have unpacked "
                f"({max_bytes} bytes, adapters.max_bytes)",
            )
        with source.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise AdapterRejected("invalid_source", f"cannot read {quote(source)}: {exc.strerror}") from None
    try:
        if magic.startswith(b"\x1f\x8b"):
            _extract_tar_gz(source, dest, budget, layout)
        elif magic in (b"PK\x03\x04", b"PK\x05\x06"):
            _extract_zip(source, dest, budget, layout)
        else:
            raise AdapterRejected(
                "invalid_archive",
                "the upload is neither an adapter directory nor a .tar.gz or .zip archive",
            )
    except UnicodeDecodeError:  # zipfile: a name flagged UTF-8 that is not
        raise AdapterRejected("invalid_archive", "a member name of the archive is not valid UTF-8") from None
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise AdapterRejected("invalid_archive", f"the archive is corrupt or truncated: {_reason(exc, dest)}") from None
    except (NotImplementedError, RuntimeError) as exc:  # zipfile: unknown compression, encryption
        raise AdapterRejected("invalid_archive", f"the archive cannot be read: {_reason(exc, dest)}") from None


def _reason(exc: BaseException, dest: Path) -> str:
    """The error in one short line without a server path: an OSError's filename is where
    the upload was being written, so only its strerror is told."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).replace(str(dest.parent), "<upload>").split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---------------------------------------------------------------- members


def _member_parts(name: str) -> list[str]:
    """The path components of member `name`; [] for the root itself (`./`)."""
    if "\\" in name or "\x00" in name:
        raise _unsafe(name, "has a backslash or NUL in its name")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise _unsafe(name, "is an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _unsafe(name, "points outside the archive (..)")
    for part in parts:
        try:
            too_long = len(os.fsencode(part)) > _NAME_MAX
        except UnicodeError:
            raise AdapterRejected("invalid_archive", f"archive member {quote(name)} has a name no file can have") from None
        if too_long:
            raise AdapterRejected(
                "invalid_archive", f"archive member {quote(name)} has a path component longer than {_NAME_MAX} bytes"
            )
    return parts


def _member_path(dest: Path, parts: list[str]) -> Path | None:
    """Where a member goes under `dest`; None for the root itself."""
    return dest.joinpath(*parts) if parts else None


def _skipped(parts: list[str]) -> bool:
    return bool(parts) and parts[0] == _MAC_METADATA


class _Layout:
    """Where an upload's files may be: all at its top level, or all in one top-level
    dir, never deeper; and each one of ACCEPTED_FILES. Checked per member, before
    anything of it is written."""

    def __init__(self) -> None:
        self.top: str | None = None  # the one top-level dir, once a member is in it
        self.flat = False  # a file was seen at the top level

    def directory(self, name: str, parts: list[str]) -> None:
        if len(parts) > 1:
            raise unexpected(name, "is a nested directory")
        if self.flat:
            raise unexpected(name, "is a directory, but the other files are at the top level")
        self._inside(name, parts[0])

    def file(self, name: str, parts: list[str]) -> None:
        if len(parts) > 2:
            raise unexpected(name, "is in a nested directory")
        check_member(name, parts[-1])
        if len(parts) == 2:
            self._inside(name, parts[0])
        elif self.top is not None:
            raise unexpected(name, f"is at the top level, but the other files are in the directory {quote(self.top)}")
        else:
            self.flat = True

    def _inside(self, name: str, top: str) -> None:
        if self.flat:
            raise unexpected(name, "is in a directory, but the other files are at the top level")
        if self.top is not None and top != self.top:
            raise unexpected(name, f"is in a second top-level directory (besides {quote(self.top)})")
        self.top = top


def _unsafe(name: str, why: str) -> AdapterRejected:
    return AdapterRejected(
        "unsafe_archive",
        f"archive member {quote(name)} {why}; archives may hold only regular files and "
        "directories with relative paths",
    )


@contextlib.contextmanager
def _storing(path: Path, name: str) -> Iterator[None]:
    """A full or broken data dir is the server's failure, not a bad upload: it must not
    come back as a 4xx rejection (the OSError handlers in unpack would make it one).
    Any other OSError is the member's (a name the filesystem refuses): it is named as
    the tenant wrote it, without the path it was to be written to."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _STORAGE_ERRNOS:
            raise TuneserveError(f"cannot store the adapter upload in {path.parent}: {exc.strerror}") from exc
        raise AdapterRejected(
            "invalid_archive", f"archive member {quote(name)} cannot be extracted: {exc.strerror or type(exc).__name__}"
        ) from None


def _write(src: IO[bytes], path: Path, budget: _Budget, name: str) -> None:
    with _storing(path, name):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: a second member of the same name must not overwrite the first one
            # after it was (or while it is) checked. O_NOFOLLOW: never write through a link.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            raise _unsafe(name, "appears twice") from None
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                budget.consume(len(chunk))
                out.write(chunk)


def _mkdir(path: Path | None, name: str) -> None:
    if path is not None:
        with _storing(path, name):
            path.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- formats


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _CappedReader:
    """A read-only stream that refuses to yield more than `limit` bytes."""

    def __init__(self, raw: _Readable, limit: int, budget: _Budget) -> None:
        self.raw, self.limit, self.budget, self.count = raw, limit, budget, 0

    def read(self, size: int = -1) -> bytes:
        room = self.limit - self.count + 1  # one byte over proves the stream is too big
        data = self.raw.read(room if size is None or size < 0 else min(size, room))
        self.count += len(data)
        if self.count > self.limit:
            raise self.budget.too_large()
        return data


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized extended headers before tarfile reads them: a PAX
    record or GNU long name is read into memory whole, so its declared size bounds what
    one upload can make the gateway hold."""

    # Private in tarfile (stable since Python 3.2), so untyped in typeshed.
    def _proc_pax(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        _check_header_size(self)
        return super()._proc_pax(archive)  # type: ignore[misc]

    def _proc_gnulong(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        _check_header_size(self)
        return super()._proc_gnulong(archive)  # type: ignore[misc]


def _check_header_size(header: tarfile.TarInfo) -> None:
    if header.size > _MAX_TAR_HEADER:
        raise AdapterRejected(
            "invalid_archive",
            f"the archive has an extended (PAX or long-name) header of {header.size} bytes, "
            f"more than {_MAX_TAR_HEADER}; make the archive with plain tar or zip",
        )


def _extract_tar_gz(source: Path, dest: Path, budget: _Budget, layout: _Layout) -> None:
    limit = budget.max_bytes + _TAR_OVERHEAD + budget.max_files * _TAR_OVERHEAD_PER_ENTRY
    with gzip.open(source, "rb") as raw:
        # Stream mode ("r|"): members are read one by one as they come, never indexed first.
        reader = _CappedReader(raw, limit, budget)
        with tarfile.open(fileobj=reader, mode="r|", tarinfo=_BoundedTarInfo) as tar:  # type: ignore[call-overload]  # a file-like read() is all tarfile uses
            for member in tar:
                parts = _member_parts(member.name)
                if _skipped(parts):
                    continue
                path = _member_path(dest, parts)
                if member.issym() or member.islnk():
                    raise _unsafe(member.name, f"is a link (to {quote(member.linkname)})")
                if member.isdir():
                    if path is not None:
                        layout.directory(member.name, parts)
                        budget.entry()
                    _mkdir(path, member.name)
                elif member.isreg() and not member.issparse() and path is not None:
                    layout.file(member.name, parts)
                    budget.entry()
                    budget.expect(member.size)
                    src = tar.extractfile(member)
                    assert src is not None  # regular members always have data
                    _write(src, path, budget, member.name)
                elif member.ischr() or member.isblk() or member.isfifo():
                    raise _unsafe(member.name, "is a device file or FIFO")
                else:
                    raise _unsafe(member.name, "is not a regular file or directory")


def _extract_zip(source: Path, dest: Path, budget: _Budget, layout: _Layout) -> None:
    with zipfile.ZipFile(source) as archive:
        members = archive.infolist()
        # Declared sizes first: a bomb is refused before one byte is inflated.
        if len(members) > budget.max_files:
            raise budget.too_many()
        budget.expect(sum(member.file_size for member in members))
        for member in members:
            parts = _member_parts(member.filename)
            if _skipped(parts):
                continue
            path = _member_path(dest, parts)
            kind = stat.S_IFMT(member.external_attr >> 16)  # 0 when made on Windows
            if kind == stat.S_IFLNK:
                raise _unsafe(member.filename, "is a symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _unsafe(member.filename, "is a device file or FIFO")
            if member.is_dir() or kind == stat.S_IFDIR:
                if path is not None:
                    layout.directory(member.filename, parts)
                    budget.entry()
                _mkdir(path, member.filename)
                continue
            if path is None:
                raise _unsafe(member.filename, "has an empty name")
            layout.file(member.filename, parts)
            budget.entry()
            # Counted again while inflating: the declared size is only a claim.
            with archive.open(member) as src:
                _write(src, path, budget, member.filename)


def _copy_dir(source: Path, dest: Path, budget: _Budget, layout: _Layout) -> None:
    """Copy an adapter dir. Symlinks to files are followed (an HF cache snapshot is
    made of them); anything that is not a file or a real dir is refused.

    Each entry is opened first and judged by what was opened (fstat), never by a
    stat of its path followed by an open of the same path: between the two, a link
    could be pointed elsewhere. Directories are walked by descriptor, refusing links."""
    try:
        top = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise AdapterRejected("invalid_source", f"{quote(source)} cannot be read: {exc.strerror}") from None
    try:
        _copy_dir_fd(top, source, dest, budget, layout, ())
    finally:
        os.close(top)


def _copy_dir_fd(
    dir_fd: int, source: Path, dest: Path, budget: _Budget, layout: _Layout, parts: tuple[str, ...]
) -> None:
    """`parts`: where this dir is in the upload, which `layout` judges like an
    archive's member names; `source` only names things in messages."""
    with os.scandir(dir_fd) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        inner = [*parts, entry.name]
        # A dir still being built by a tuneserve job (fsutil.staged_dir: a combined
        # adapter published from its stage) holds its owner record.
        if _skipped(inner) or inner == [OWNER_FILE]:
            continue
        target, name = dest / entry.name, "/".join(inner)
        shown = quote(str(source.joinpath(*inner)))
        budget.entry()
        if entry.is_dir(follow_symlinks=False):
            try:
                sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except OSError:  # replaced by a link or a file since it was listed
                raise AdapterRejected("invalid_source", f"{shown} changed while it was copied") from None
            try:
                layout.directory(name, inner)
                _mkdir(target, name)
                _copy_dir_fd(sub, source, target, budget, layout, tuple(inner))
            finally:
                os.close(sub)
            continue
        try:
            # O_NONBLOCK: a FIFO must not hang the open; it is refused by fstat below.
            fd = os.open(entry.name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
        except FileNotFoundError:
            raise AdapterRejected("invalid_source", f"{shown} is a broken symlink") from None
        except OSError as exc:
            raise AdapterRejected("invalid_source", f"{shown} cannot be read: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as src:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise AdapterRejected(
                    "invalid_source",
                    f"{shown} is not a regular file or directory (symlinked dirs, "
                    "devices and FIFOs are not accepted)",
                )
            layout.file(name, inner)
            budget.expect(info.st_size)
            _write(src, target, budget, name)
