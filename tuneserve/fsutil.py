"""Filesystem helpers that keep half-written outputs invisible."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from tuneserve.errors import TuneserveError
from tuneserve.processes import process_alive, process_start_time

log = logging.getLogger(__name__)


OWNER_FILE = ".tuneserve-owner.json"
# An owner on another host (a data dir shared by replicas) cannot be asked whether it is
# alive; nothing writes to one temp dir for this long, so a dir this old is a dead one's.
FOREIGN_STALE_S = 6 * 3600
# A temp dir without an owner record: made by a version before owner records, or by a
# process killed between creating it and recording itself (microseconds).
UNOWNED_STALE_S = 3600


def owned_temp_dir(parent: Path, prefix: str) -> Path:
    """A new temp dir `parent/<prefix>XXXX` that records its owner (host, pid, start time).

    First removes the `<prefix>*` dirs whose owner is gone (a crash, a kill, Ctrl-C at the
    wrong time), so what a dead run left never outlives the next run of its kind."""
    parent.mkdir(parents=True, exist_ok=True)
    for path in remove_orphaned_temp_dirs(parent, prefix):
        log.warning("removed %s, left by a run that died", path)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary dir
    pid = os.getpid()
    owner = {"host": socket.gethostname(), "pid": pid, "start": process_start_time(pid)}
    (tmp / OWNER_FILE).write_text(json.dumps(owner))
    return tmp


def _orphaned(path: Path, now: float) -> bool:
    try:
        owner = json.loads((path / OWNER_FILE).read_text())
        host, pid, start = owner["host"], int(owner["pid"]), owner["start"]
    except (OSError, ValueError, KeyError, TypeError):
        return path.stat().st_mtime < now - UNOWNED_STALE_S
    if host != socket.gethostname():
        return path.stat().st_mtime < now - FOREIGN_STALE_S
    return not process_alive(pid, start)


def remove_orphaned_temp_dirs(parent: Path, prefix: str) -> list[Path]:
    """Delete the `parent/<prefix>*` temp dirs whose owning process is gone."""
    removed = []
    now = time.time()
    for path in parent.glob(f"{prefix}*"):
        try:
            if path.is_dir() and not path.is_symlink() and _orphaned(path, now):
                shutil.rmtree(path)
                removed.append(path)
        except OSError:
            continue  # another process removed it first, or it is not ours to delete
    return removed


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; rename it into place only if the block succeeds.

    The temp dir sits in the same parent so the rename is atomic on one filesystem; one
    left by a dead run is removed by the next `staged_dir` of the same `final`.
    """
    tmp = owned_temp_dir(final.parent, f".{final.name}.tmp-")
    try:
        yield tmp
        (tmp / OWNER_FILE).unlink()
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: Path, data: str | bytes, *, durable: bool = False, mode: int = 0o644) -> None:
    """Replace `path` with `data` in one rename: a reader sees the old file or the new one,
    never half of it. `durable` also fsyncs the data before the rename, for records that
    must survive a power cut (the adapter registry's pointers), not for caches."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
