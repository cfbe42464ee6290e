"""Filesystem helpers that keep half-written outputs invisible."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from tuneserve.errors import TuneserveError


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; rename it into place only if the block succeeds.

    The temp dir sits in the same parent so the rename is atomic on one filesystem.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary dir
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temp_dirs(parent: Path, prefix: str, older_than_s: float) -> list[Path]:
    """Delete `parent/<prefix>*` dirs untouched for `older_than_s`: what a killed
    process left behind. The age keeps a slow writer's live dir, even in another process.
    """
    cutoff = time.time() - older_than_s
    removed = []
    for path in parent.glob(f"{prefix}*"):
        try:
            if path.is_dir() and not path.is_symlink() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path)
                removed.append(path)
        except OSError:
            continue  # another process removed it first, or it is not ours to delete
    return removed


class InsufficientDiskSpace(TuneserveError):
    pass


def require_free_space(directory: Path, needed_bytes: int, what: str) -> None:
    """Fail before a large write that would not fit, instead of halfway through it."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise InsufficientDiskSpace(
            f"{what} needs about {needed_bytes / 2**30:.2f} GiB in {directory}, "
            f"but only {free / 2**30:.2f} GiB is free"
        )
