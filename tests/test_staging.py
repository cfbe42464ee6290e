"""Temp dirs that a run builds its output in: what a dead run left (crash, SIGKILL) is
removed by the next run of the same kind, a live run's never, and Ctrl-C leaves nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.servers import ROOT
from tuneserve.fsutil import OWNER_FILE, owned_temp_dir, staged_dir, write_atomic

# Enters staged_dir(FINAL), writes a file, says where, then waits to be killed.
STAGING_CHILD = """
import sys, time
from pathlib import Path
from tuneserve.fsutil import staged_dir
with staged_dir(Path(sys.argv[1])) as stage:
    (stage / "half-written").write_bytes(b"x" * 1000)
    print(stage, flush=True)
    time.sleep(600)
"""


def _stage_in_child(final: Path) -> tuple[subprocess.Popen, Path]:
    child = subprocess.Popen([sys.executable, "-c", STAGING_CHILD, str(final)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


def test_a_killed_runs_temp_dir_is_removed_by_the_next_run(tmp_path: Path) -> None:
    final = tmp_path / "models" / "model"
    child, stage = _stage_in_child(final)
    try:
        assert stage.is_dir() and stage.name.startswith(".model.tmp-")
        with staged_dir(final) as mine:  # the owner is alive: its dir stays
            (mine / "ok").write_text("done")
        assert stage.is_dir() and (final / "ok").is_file()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert stage.is_dir()  # SIGKILL runs no cleanup...
    with staged_dir(final) as mine:
        (mine / "ok").write_text("again")
    assert not stage.exists()  # ...the next run of its kind removes it
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]
    assert not (final / OWNER_FILE).exists()  # the owner record does not reach the output


def test_only_temp_dirs_of_its_own_kind_are_touched(tmp_path: Path) -> None:
    child, other = _stage_in_child(tmp_path / "other")
    child.send_signal(signal.SIGKILL)
    child.wait()
    with staged_dir(tmp_path / "model"):
        pass
    assert other.is_dir()  # a dead run's, but of another output


def test_a_dir_recorded_by_another_host_waits_for_its_age(tmp_path: Path) -> None:
    foreign = tmp_path / ".adapter-upload-elsewhere"
    foreign.mkdir()
    (foreign / OWNER_FILE).write_text(json.dumps({"host": "another-replica", "pid": 1, "start": "1"}))
    owned_temp_dir(tmp_path, ".adapter-upload-")
    assert foreign.is_dir()  # its pid means nothing here
    week_old = time.time() - 7 * 24 * 3600
    os.utime(foreign, (week_old, week_old))
    owned_temp_dir(tmp_path, ".adapter-upload-")
    assert not foreign.exists()


def test_a_recycled_pid_does_not_keep_a_dir(tmp_path: Path) -> None:
    stale = owned_temp_dir(tmp_path, ".x.tmp-")
    owner = json.loads((stale / OWNER_FILE).read_text())
    # This very process, but with another start time: the pid was reused.
    (stale / OWNER_FILE).write_text(json.dumps({**owner, "start": "0"}))
    fresh = owned_temp_dir(tmp_path, ".x.tmp-")
    assert not stale.exists() and fresh.is_dir()


def test_ctrl_c_inside_staging_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(final) as stage:
            (stage / "half").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "records" / "current"
    write_atomic(target, "v1\n", durable=True)
    write_atomic(target, b"v2\n")
    assert target.read_text() == "v2\n" and oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in target.parent.iterdir()] == ["current"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "current"
    write_atomic(target, "v1\n")

    def no_space(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, "v2\n")
    assert target.read_text() == "v1\n" and [p.name for p in tmp_path.iterdir()] == ["current"]
