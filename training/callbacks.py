"""The Trainer callbacks of every run: Ctrl-C, a log line per step, TensorBoard, early stopping.

The callback classes are built on first use, so importing this module does not
import torch.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from training.config import RunConfig

logger = logging.getLogger("tuneserve.train")


class StopRequest(Protocol):
    requested: bool

    def install(self) -> None: ...

    def uninstall(self) -> None: ...


class SessionProgress(Protocol):
    """Where this process's session began: a resumed run counts its tokens/s from here."""

    start_tokens: int
    start_time: float
    start_step: int


@dataclass(frozen=True)
class RunCallbacks:
    stop: StopRequest
    progress: SessionProgress


def stop_on_signal() -> StopRequest:
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        """Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and stops.

        A second Ctrl-C aborts at once (the last saved checkpoint stays usable)."""

        def __init__(self) -> None:
            self.requested = False
            self._previous: dict[int, Any] = {}

        def install(self) -> None:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

        def uninstall(self) -> None:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

        def _handle(self, signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            logger.warning("stop requested: saving a checkpoint after this step (Ctrl-C again to abort)")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.requested:
                control.should_save = True
                control.should_training_stop = True

    return StopOnSignal()


def progress_log() -> SessionProgress:
    from transformers import TrainerCallback

    class ProgressLog(TrainerCallback):
        """One log line per logging step (the progress bar is not in log files), and
        the tokens and time of this session, for tokens/s after a resume too."""

        def __init__(self) -> None:
            self.start_tokens = 0
            self.start_time = time.monotonic()
            self.start_step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start_tokens = state.num_input_tokens_seen
            self.start_step = state.global_step
            self.start_time = time.monotonic()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            shown = {k: round(v, 5) if isinstance(v, float) else v for k, v in (logs or {}).items()}
            logger.info("step %d/%d: %s", state.global_step, state.max_steps, json.dumps(shown))

    return ProgressLog()


def add_run_callbacks(trainer: Any, run: RunConfig, tensorboard_dir: Path) -> RunCallbacks:
    callbacks = RunCallbacks(stop_on_signal(), progress_log())
    trainer.add_callback(callbacks.stop)
    trainer.add_callback(callbacks.progress)
    if run.tensorboard:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        # Its own dir, also when the writer is reopened for the eval after training.
        tensorboard.logging_dir = str(tensorboard_dir)
        trainer.add_callback(tensorboard)
    if run.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(run.early_stopping_patience, run.early_stopping_threshold))
    return callbacks
