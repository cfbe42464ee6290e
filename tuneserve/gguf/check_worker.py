"""Child-process entry of isolated.py: `python -m tuneserve.gguf.check_worker TASK RESULT_FILE`,
the task's request as JSON on stdin. Exit 0 with the result written, 2 on a bad call;
a native crash ends the process by its signal, which the parent reports."""

from __future__ import annotations

import faulthandler
import sys
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from tuneserve.gguf import agreement

# task name -> (request model, function)
TASKS: dict[str, tuple[type[BaseModel], Callable[[Any], BaseModel]]] = {
    "teacher_forced": (agreement.TeacherForcedRequest, agreement.teacher_forced_scores),
    "decode_check": (agreement.DecodeCheckRequest, agreement.decode_check),
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in TASKS:
        print(f"usage: check_worker {{{'|'.join(TASKS)}}} RESULT_FILE", file=sys.stderr)
        return 2
    # The Python stack of a native crash goes to stderr, next to llama.cpp's log.
    faulthandler.enable()
    request_model, run = TASKS[argv[0]]
    result = run(request_model.model_validate_json(sys.stdin.read()))
    Path(argv[1]).write_text(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
