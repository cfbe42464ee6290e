"""Unpack an adapter upload (a dir, a .tar.gz or a .zip) into a private dir, safely.

Archives come from tenants, so members are never handed to `extractall`: each name is
checked (no absolute path, no `..`), only regular files and dirs are created (no links,
devices or FIFOs), and sizes and counts are enforced while extracting, so a zip or gzip
bomb stops at the cap instead of filling the disk. The format is recognised by its
magic bytes, not its file name: an HTTP upload arrives as a temp file.
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
from tuneserve.adapters.validation import AdapterRejected, quote
from tuneserve.errors import TuneserveError

_CHUNK = 1 << 20
# Tar headers, padding and PAX records count against the decompressed stream too: a
# bomb can hide in a huge PAX header, which tarfile reads into memory in one go.
_TAR_OVERHEAD_PER_ENTRY = 8 * 1024
_TAR_OVERHEAD = 1 << 20
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


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
    budget = _Budget(max_bytes, max_files)
    try:
        if source.is_dir():
            _copy_dir(source, dest, budget)
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
            _extract_tar_gz(source, dest, budget)
        elif magic in (b"PK\x03\x04", b"PK\x05\x06"):
            _extract_zip(source, dest, budget)
        else:
            raise AdapterRejected(
                "invalid_archive",
                "the upload is neither an adapter directory nor a .tar.gz or .zip archive",
            )
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise AdapterRejected("invalid_archive", f"the archive is corrupt or truncated: {exc}") from None
    except (NotImplementedError, RuntimeError) as exc:  # zipfile: unknown compression, encryption
        raise AdapterRejected("invalid_archive", f"the archive cannot be read: {exc}") from None


# ---------------------------------------------------------------- members


def _member_path(dest: Path, name: str) -> Path | None:
    """Where member `name` goes under `dest`; None for the root itself (`./`)."""
    if "\\" in name or "\x00" in name:
        raise _unsafe(name, "has a backslash or NUL in its name")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise _unsafe(name, "is an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _unsafe(name, "points outside the archive (..)")
    return dest.joinpath(*parts) if parts else None


def _unsafe(name: str, why: str) -> AdapterRejected:
    return AdapterRejected(
        "unsafe_archive",
        f"archive member {quote(name)} {why}; archives may hold only regular files and "
        "directories with relative paths",
    )


@contextlib.contextmanager
def _storing(path: Path) -> Iterator[None]:
    """A full or broken data dir is the server's failure, not a bad upload: it must not
    come back as a 4xx rejection (the OSError handlers in unpack would make it one)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _STORAGE_ERRNOS:
            raise TuneserveError(f"cannot store the adapter upload in {path.parent}: {exc.strerror}") from exc
        raise


def _write(src: IO[bytes], path: Path, budget: _Budget, name: str) -> None:
    with _storing(path):
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


def _mkdir(path: Path | None) -> None:
    if path is not None:
        with _storing(path):
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


def _extract_tar_gz(source: Path, dest: Path, budget: _Budget) -> None:
    limit = budget.max_bytes + _TAR_OVERHEAD + budget.max_files * _TAR_OVERHEAD_PER_ENTRY
    with gzip.open(source, "rb") as raw:
        # Stream mode ("r|"): members are read one by one as they come, never indexed first.
        with tarfile.open(fileobj=_CappedReader(raw, limit, budget), mode="r|") as tar:  # type: ignore[call-overload]  # a file-like read() is all tarfile uses
            for member in tar:
                path = _member_path(dest, member.name)
                if member.issym() or member.islnk():
                    raise _unsafe(member.name, f"is a link (to {quote(member.linkname)})")
                if member.isdir():
                    if path is not None:
                        budget.entry()
                    _mkdir(path)
                elif member.isreg() and not member.issparse() and path is not None:
                    budget.entry()
                    budget.expect(member.size)
                    src = tar.extractfile(member)
                    assert src is not None  # regular members always have data
                    _write(src, path, budget, member.name)
                elif member.ischr() or member.isblk() or member.isfifo():
                    raise _unsafe(member.name, "is a device file or FIFO")
                else:
                    raise _unsafe(member.name, "is not a regular file or directory")


def _extract_zip(source: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(source) as archive:
        members = archive.infolist()
        # Declared sizes first: a bomb is refused before one byte is inflated.
        if len(members) > budget.max_files:
            raise budget.too_many()
        budget.expect(sum(member.file_size for member in members))
        for member in members:
            path = _member_path(dest, member.filename)
            kind = stat.S_IFMT(member.external_attr >> 16)  # 0 when made on Windows
            if kind == stat.S_IFLNK:
                raise _unsafe(member.filename, "is a symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _unsafe(member.filename, "is a device file or FIFO")
            if member.is_dir() or kind == stat.S_IFDIR:
                if path is not None:
                    budget.entry()
                _mkdir(path)
                continue
            if path is None:
                raise _unsafe(member.filename, "has an empty name")
            budget.entry()
            # Counted again while inflating: the declared size is only a claim.
            with archive.open(member) as src:
                _write(src, path, budget, member.filename)


def _copy_dir(source: Path, dest: Path, budget: _Budget) -> None:
    """Copy an adapter dir. Symlinks to files are followed (an HF cache snapshot is
    made of them); anything that is not a file or a real dir is refused."""
    with os.scandir(source) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        target = dest / entry.name
        try:
            info = os.stat(entry.path)  # follows symlinks
        except FileNotFoundError:
            raise AdapterRejected("invalid_source", f"{quote(entry.path)} is a broken symlink") from None
        budget.entry()
        if stat.S_ISDIR(info.st_mode) and not entry.is_symlink():
            _mkdir(target)
            _copy_dir(Path(entry.path), target, budget)
        elif stat.S_ISREG(info.st_mode):
            budget.expect(info.st_size)
            # O_NONBLOCK: if the file was swapped for a FIFO since stat, open must not hang.
            fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as src:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise AdapterRejected("invalid_source", f"{quote(entry.path)} is not a regular file")
                _write(src, target, budget, entry.name)
        else:
            raise AdapterRejected(
                "invalid_source",
                f"{quote(entry.path)} is not a regular file or directory (symlinked dirs, "
                "devices and FIFOs are not accepted)",
            )
