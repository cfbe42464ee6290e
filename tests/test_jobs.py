"""Jobs: a merge killed mid-run is reported failed (never "running"), its staging dir
is removed, it can be re-run; cancel stops a running job and publishes nothing. The
in-process runner tests run on SQLite and on a real PostgreSQL (the `jobs` fixture),
with the cross-machine part: claims, leases, a cancel from another host."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.support.adapters import HF_DIR
from tests.support.merges import GGUF, adapters, cli, full_models, job_of, merge_work, write_yaml  # noqa: F401
from tests.support.postgres_server import migrated_store
from tests.support.servers import ROOT
from tuneserve.db import Store
from tuneserve.db.sqlite import SQLiteStore
from tuneserve.jobs import runner
from tuneserve.jobs.runner import run_job, submit
from tuneserve.jobs.store import JobError, JobStatus, JobStore

MODEL_ARGS = ("--model.hf_path", str(HF_DIR), "--model.gguf_path", str(GGUF))


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """Opens another store on one database: each is a separate instance (machine)."""
    if request.param == "sqlite":
        make: Callable[[], Store] = lambda: SQLiteStore(tmp_path / "tuneserve.db")  # noqa: E731
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        migrated_store(dsn).close()
        make = lambda: migrated_store(dsn)  # noqa: E731
    opened: list[Store] = []

    def new() -> Store:
        opened.append(make())
        return opened[-1]

    yield new
    for store in opened:
        store.close()


@pytest.fixture
def jobs(new_store: Callable[[], Store]) -> JobStore:
    return JobStore(new_store())


def _start_merge(config: Path, out: Path, data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tuneserve.cli.main", "merge", str(config), "--out", str(out), "--data_dir", str(data_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(db: Path, sql: str, timeout_s: float = 180) -> sqlite3.Row:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if db.is_file():
            with sqlite3.connect(db) as conn:
                conn.row_factory = sqlite3.Row
                try:
                    row = conn.execute(sql).fetchone()
                except sqlite3.OperationalError:  # table not created yet
                    row = None
            if row is not None:
                return row
        time.sleep(0.05)
    raise TimeoutError(sql)


def _linear_config(merge_work: Path, full_models: list[Path]) -> Path:
    return write_yaml(merge_work / "jobs-linear.yaml", {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in full_models],
    })


def test_job_killed_mid_run_is_failed_on_restart_and_can_rerun(merge_work, full_models, tmp_path):
    data_dir = tmp_path / "data"
    out = tmp_path / "merged"
    process = _start_merge(_linear_config(merge_work, full_models), out, data_dir)
    # Kill it while it writes: once the staging dir is recorded.
    row = _wait_for(data_dir / "tuneserve.db", "SELECT id, staging FROM jobs WHERE status = 'running' AND staging IS NOT NULL")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    staging = Path(row["staging"])

    jobs = job_of(cli("jobs", "list", data_dir=data_dir))
    assert [(j["id"], j["status"]) for j in jobs] == [(row["id"], "failed")]
    assert "died while it ran" in jobs[0]["error"] and f"jobs rerun {row['id']}" in jobs[0]["error"]
    assert not staging.exists() and not out.exists()

    rerun = job_of(cli("jobs", "rerun", row["id"], data_dir=data_dir))
    assert rerun["status"] == "succeeded" and rerun["id"] != row["id"]
    assert (out / "config.json").is_file()


def test_cancel_running_job(merge_work, full_models, tmp_path):
    data_dir = tmp_path / "data"
    out = tmp_path / "merged"
    process = _start_merge(_linear_config(merge_work, full_models), out, data_dir)
    row = _wait_for(data_dir / "tuneserve.db", "SELECT id FROM jobs WHERE status = 'running'")
    cli("jobs", "cancel", row["id"], data_dir=data_dir)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "cancelled" in stderr, stderr
    shown = job_of(cli("jobs", "show", row["id"], data_dir=data_dir))
    assert shown["status"] == "cancelled" and "cancelled" in shown["log"] + (shown["error"] or "")
    assert not out.exists() and not list(tmp_path.glob(".merged.tmp-*"))
    # A finished job cannot be cancelled again; an unknown one is a clear error.
    again = cli("jobs", "cancel", row["id"], data_dir=data_dir, check=False)
    assert again.returncode == 2 and "already cancelled" in again.stderr
    missing = cli("jobs", "show", "nope", data_dir=data_dir, check=False)
    assert missing.returncode == 2 and "no job 'nope'" in missing.stderr


def _export_adapter(adapter: Path, out: Path, data_dir: Path, stderr: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tuneserve.cli.main", "export", str(adapter), "--out", str(out),
               "--no-gate", "--data_dir", str(data_dir), *MODEL_ARGS]
    return subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, timeout=300)


def test_progress_bar_on_a_terminal_only(adapters, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal's size
    try:
        on_tty = _export_adapter(adapters[0], tmp_path / "tty.gguf", tmp_path / "data", stderr=terminal)
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal's other end closed: all is read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    assert on_tty.returncode == 0, shown[-2000:]
    job_id = json.loads(on_tty.stdout)["id"]
    assert f"job {job_id}".encode() in shown and b"100%|" in shown

    piped = _export_adapter(adapters[0], tmp_path / "piped.gguf", tmp_path / "data", stderr=subprocess.PIPE)
    assert piped.returncode == 0 and b"%|" not in piped.stderr  # no bar in logs


def test_export_refused_up_front_when_the_disk_is_short(full_models, tmp_path, monkeypatch, capsys):
    import shutil

    from tuneserve.cli.main import main

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1024))
    out = tmp_path / "full.gguf"
    code = main(["export", str(full_models[0]), "--out", str(out), "--type", "f16",
                 "--data_dir", str(tmp_path / "data"), *MODEL_ARGS])
    err = capsys.readouterr().err
    assert code == 2 and "needs about" in err and "only 0.00 GiB is free" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]  # nothing written beside it
    monkeypatch.undo()
    jobs = job_of(cli("jobs", "list", data_dir=tmp_path / "data"))
    assert [j["status"] for j in jobs] == ["failed"] and "needs about" in jobs[0]["error"]


def test_cancel_landing_as_the_job_starts_is_a_clean_cancel(jobs, monkeypatch):
    """The cancel that arrives the instant the row says "running" (the window the CLI test
    above races through) ends the job cancelled, never as a stray signal and a stuck row."""
    job_id = submit(jobs, "merge", {"what": "nothing"})
    started = JobStore.mark_running

    def start_then_cancel(self: JobStore, job: str) -> None:
        started(self, job)
        self.request_cancel(job)  # flags the row and SIGTERMs this very process
        # What a loaded machine does at random: the signal is handled before `mark_running`
        # has returned to the runner.
        time.sleep(0.05)

    monkeypatch.setattr(JobStore, "mark_running", start_then_cancel)
    handler_before = signal.getsignal(signal.SIGTERM)
    ran = []
    # A second thread, as a loaded test process has (servers' readers, pools): the kernel
    # may hand the process-directed SIGTERM to it, and Python then runs the handler in
    # the main thread at once, whatever signal mask the main thread has.
    idle = threading.Event()
    bystander = threading.Thread(target=idle.wait, daemon=True)
    bystander.start()
    try:
        with pytest.raises(JobError, match="cancelled"):
            run_job(jobs, job_id, lambda ctx: ran.append(1) or [])
    finally:
        idle.set()
    assert ran == [] and jobs.get(job_id).status is JobStatus.cancelled
    # The process is left as it was: its own SIGTERM handler, the signal not blocked.
    assert signal.getsignal(signal.SIGTERM) == handler_before
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def _sleep_through_signal(seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


def test_cancel_that_library_code_rewraps_is_still_a_cancel(jobs):
    """Library code may catch the runner's interruption and raise its own exception
    instead (a bare `except:` that re-raises as RuntimeError). The job still ends
    cancelled, with a JobError, and the log keeps what the library raised."""
    job_id = submit(jobs, "merge", {"what": "nothing"})

    def wrapping_work(ctx) -> list[str]:
        try:
            jobs.request_cancel(job_id)  # flags the row and SIGTERMs this very process
            _sleep_through_signal()
        except BaseException as exc:
            raise RuntimeError("tensor loader failed") from exc
        return ["never"]

    with pytest.raises(JobError, match="cancelled; nothing was published"):
        run_job(jobs, job_id, wrapping_work)
    record = jobs.get(job_id)
    assert record.status is JobStatus.cancelled and record.outputs == []
    assert "after SIGTERM: RuntimeError: tensor loader failed" in record.log


def test_second_sigterm_while_recording_the_cancel(jobs, monkeypatch):
    """A SIGTERM repeated while the first is being recorded (an impatient operator, a
    pod's stop) cannot cut the recording short or escape as a raw signal."""
    job_id = submit(jobs, "merge", {"what": "nothing"})
    finished = JobStore.mark_finished

    def signal_again_then_finish(self: JobStore, job: str, *args, **kwargs) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here, mid-recording
        finished(self, job, *args, **kwargs)

    def work(ctx) -> list[str]:
        monkeypatch.setattr(JobStore, "mark_finished", signal_again_then_finish)
        jobs.request_cancel(job_id)
        _sleep_through_signal()
        return ["never"]

    with pytest.raises(JobError, match="cancelled"):
        run_job(jobs, job_id, work)
    assert jobs.get(job_id).status is JobStatus.cancelled


def test_sigterm_without_a_cancel_fails_the_job(jobs):
    """A SIGTERM that is no cancel (the host shutting down) fails the job, saying so."""
    job_id = submit(jobs, "merge", {"what": "nothing"})

    def work(ctx) -> list[str]:
        os.kill(os.getpid(), signal.SIGTERM)
        _sleep_through_signal()
        return ["never"]

    with pytest.raises(JobError, match="interrupted by SIGTERM"):
        run_job(jobs, job_id, work)
    record = jobs.get(job_id)
    assert record.status is JobStatus.failed and "interrupted by SIGTERM" in (record.error or "")


# ---------------------------------------------------------------- across machines


def _race(runners: list[JobStore], job_id: str) -> tuple[list[int], list[str]]:
    """Both runners start `job_id` at once; which ran it, and what the other was told."""
    start = threading.Barrier(len(runners))
    ran: list[int] = []
    refused: list[str] = []

    def race(n: int) -> None:
        start.wait()
        try:
            run_job(runners[n], job_id, lambda ctx: ran.append(n) or [], show_progress=False)
        except JobError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=race, args=(n,)) for n in range(len(runners))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return ran, refused


def test_two_runners_claim_one_job_once(new_store):
    """Two runners (each its own store, as on two machines) start the same queued job at
    the same moment, over and over: exactly one runs it each time."""
    creator = JobStore(new_store())
    runners = [JobStore(new_store()), JobStore(new_store())]
    for _ in range(10):
        job_id = submit(creator, "merge", {"what": "nothing"})
        ran, refused = _race(runners, job_id)
        assert len(ran) == 1 and len(refused) == 1, (ran, refused)
        assert "claimed by another runner" in refused[0] or "not queued" in refused[0]
        assert creator.get(job_id).status is JobStatus.succeeded
        owner = creator.store.query("SELECT owner FROM jobs WHERE id = ?", (job_id,))[0]["owner"]
        assert owner == str(runners[ran[0]].owner)


def _as_remote(jobs: JobStore, job_id: str, status: str, lease_in_s: float) -> None:
    """Make a job look owned by a runner on another machine, its lease due in lease_in_s."""
    jobs.store.execute(
        "UPDATE jobs SET status = ?, owner = ?, lease_expires_at = ?, pid = ?, pid_start = ? WHERE id = ?",
        (status, "elsewhere.example:4242:99:abcd", time.time() + lease_in_s, 4242, "99", job_id),
    )


def test_a_remote_owner_is_failed_only_once_its_lease_expires(jobs, tmp_path):
    staging = tmp_path / ".out.tmp-remote"
    staging.mkdir()
    live, dead, queued = (submit(jobs, "merge", {"n": n}) for n in range(3))
    _as_remote(jobs, live, "running", lease_in_s=30)
    _as_remote(jobs, dead, "running", lease_in_s=-1)
    _as_remote(jobs, queued, "queued", lease_in_s=-1)
    jobs.update(dead, staging=str(staging))
    # A pid that is alive here means nothing for another host's job: only the lease counts.
    jobs.store.execute("UPDATE jobs SET pid = ? WHERE id = ?", (os.getpid(), live))

    assert sorted(JobStore(jobs.store).recover()) == sorted([dead, queued])
    assert jobs.get(live).status is JobStatus.running
    failed = jobs.get(dead)
    assert failed.status is JobStatus.failed and "stopped renewing its lease" in (failed.error or "")
    assert f"tuneserve jobs rerun {dead}" in (failed.error or "") and not staging.exists()
    assert jobs.get(queued).status is JobStatus.failed
    assert JobStore(jobs.store).recover() == []  # nothing twice


def test_heartbeat_renews_the_lease_and_a_lost_lease_keeps_the_failure(jobs, monkeypatch):
    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.05)
    job_id = submit(jobs, "merge", {"what": "nothing"})
    leases: list[float] = []

    def lease() -> float:
        return jobs.store.query("SELECT lease_expires_at FROM jobs WHERE id = ?", (job_id,))[0]["lease_expires_at"]

    def work(ctx) -> list[str]:
        leases.append(lease())
        deadline = time.monotonic() + 10
        while lease() == leases[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        leases.append(lease())
        # Another instance judged the owner gone meanwhile (a partition): it failed the job.
        jobs.store.execute("UPDATE jobs SET status = 'failed', error = 'lease expired' WHERE id = ?", (job_id,))
        return ["out"]

    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(run_job(jobs, job_id, work, show_progress=False)))
    thread.start()
    thread.join(timeout=60)
    assert leases[1] > leases[0]  # renewed while the work ran
    record = jobs.get(job_id)
    assert record.status is JobStatus.failed and record.error == "lease expired"  # not turned into a success


def test_cancel_from_another_machine_reaches_the_job_through_its_heartbeat(jobs, monkeypatch):
    """A SIGTERM cannot cross machines: the flag in the row does, at the next heartbeat."""
    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.05)
    job_id = submit(jobs, "merge", {"what": "nothing"})

    def work(ctx) -> list[str]:
        # What `tuneserve jobs cancel` on another host writes (it cannot signal us).
        jobs.store.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        _sleep_through_signal()
        return ["never"]

    with pytest.raises(JobError, match="cancelled"):
        run_job(jobs, job_id, work)
    assert jobs.get(job_id).status is JobStatus.cancelled


# -- queued jobs and workers (`--queue`, `tuneserve jobs worker`)


def test_workers_on_two_machines_each_claim_a_different_job(new_store):
    """Jobs queued for any worker are claimed once each, oldest first, by concurrent
    workers on separate stores (machines); a job owned by its creator is never claimed."""
    creator = JobStore(new_store())
    owned = submit(creator, "merge", {"n": -1})  # run by its creator, not a worker
    queued = [creator.create("merge", {"n": n}, for_any_worker=True) for n in range(8)]
    workers = [JobStore(new_store()), JobStore(new_store())]
    claimed: dict[int, list[str]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(i: int) -> None:
        start.wait()
        while (job_id := workers[i].claim_next()) is not None:
            claimed[i].append(job_id)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    every = claimed[0] + claimed[1]
    assert sorted(every) == sorted(queued) and len(set(every)) == len(every), claimed
    for i, ids in claimed.items():
        for job_id in ids:
            row = creator.store.query("SELECT status, owner FROM jobs WHERE id = ?", (job_id,))[0]
            assert (row["status"], row["owner"]) == ("queued", str(workers[i].owner))
        # Each worker took its share oldest first.
        assert ids == [j for j in queued if j in ids]
    assert creator.get(owned).status is JobStatus.queued
    assert creator.store.query("SELECT owner FROM jobs WHERE id = ?", (owned,))[0]["owner"] == str(creator.owner)
    # A claimed job is leased: its worker dying frees it for recover() like any owner's.
    assert all(workers[0].claim_next() is None for _ in range(2))


def test_export_queued_then_run_by_a_worker(adapters, tmp_path):
    data_dir = tmp_path / "data"
    out = tmp_path / "queued.gguf"
    base = [sys.executable, "-m", "tuneserve.cli.main"]
    settings = ["--data_dir", str(data_dir), *MODEL_ARGS]
    queued = subprocess.run([*base, "export", str(adapters[0]), "--out", str(out), "--no-gate", "--queue", *settings],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert queued.returncode == 0, queued.stderr
    job = json.loads(queued.stdout)
    assert job["status"] == "queued" and not out.exists()

    worker = subprocess.run([*base, "jobs", "worker", "--once", *settings],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr
    lines = [json.loads(line) for line in worker.stdout.splitlines()]
    assert [(line["id"], line["status"]) for line in lines] == [(job["id"], "succeeded")]
    assert out.read_bytes()[:4] == b"GGUF"
    # Nothing left: an idle --once worker exits at once, printing nothing.
    idle = subprocess.run([*base, "jobs", "worker", "--once", *settings], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (idle.returncode, idle.stdout) == (0, "")


def test_an_idle_worker_stops_on_sigterm(tmp_path):
    worker = subprocess.Popen(
        [sys.executable, "-m", "tuneserve.cli.main", "jobs", "worker", "--poll-interval", "0.2",
         "--data_dir", str(tmp_path / "data"), *MODEL_ARGS],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "data" / "tuneserve.db").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # polling the empty queue
        assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=30)
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    assert out == ""
