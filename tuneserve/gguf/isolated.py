"""Run a llama.cpp check in a child process, so that a native crash (a segfault in a
kernel, an abort in ggml) fails the check instead of killing the command that asked.

The child is `python -m tuneserve.gguf.check_worker TASK RESULT_FILE`: the request goes
in as JSON on stdin, the result comes back as JSON in RESULT_FILE (llama.cpp writes its
log to the child's stderr, which is kept for the error message).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from tuneserve.errors import TuneserveError

LOG_TAIL_LINES = 12

Result = TypeVar("Result", bound=BaseModel)


class CheckCrashed(TuneserveError):
    """The child died from a signal: llama.cpp crashed (or was killed) mid-check."""

    def __init__(self, what: str, signal_name: str, log_tail: str) -> None:
        super().__init__(
            f"llama.cpp crashed ({signal_name}) while {what}; its last log lines:\n{log_tail}"
        )
        self.signal_name = signal_name
        self.log_tail = log_tail


class CheckFailed(TuneserveError):
    """The child exited with an error of its own (bad input, a Python exception)."""


def worker_command() -> list[str]:
    return [sys.executable, "-m", "tuneserve.gguf.check_worker"]


def _tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-LOG_TAIL_LINES:]) or "(nothing)"


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_isolated(task: str, request: BaseModel, result_type: type[Result], what: str) -> Result:
    """Run `task` of the check worker on `request` in a child; return its typed result.

    Raises CheckCrashed when the child dies from a signal, CheckFailed when it exits
    non-zero. `what` completes "llama.cpp crashed while ..." in the message."""
    with tempfile.TemporaryDirectory(prefix="tuneserve-check-") as tmp:
        result_file = Path(tmp) / "result.json"
        child = subprocess.run(
            [*worker_command(), task, str(result_file)],
            input=request.model_dump_json(),
            capture_output=True,
            text=True,
        )
        log = child.stderr + child.stdout
        if child.returncode < 0:
            raise CheckCrashed(what, _signal_name(child.returncode), _tail(log))
        if child.returncode != 0 or not result_file.is_file():
            raise CheckFailed(f"the llama.cpp check failed while {what} (exit {child.returncode}):\n{_tail(log)}")
        return result_type.model_validate(json.loads(result_file.read_text()))
