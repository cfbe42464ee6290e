"""The one place regular expressions written by a tenant are compiled and matched.

adapter_config.json may give `target_modules` as a regex, and the keys of
`alpha_pattern`/`rank_pattern` are regexes too. Python's `re` backtracks, so a pattern
of a few dozen characters can take minutes to match one module name, and it holds the
GIL throughout: run in a thread of the gateway, it freezes every request, `/health`
included. So a tenant's pattern never runs in the calling process. A child Python
(`-I -S`: no site, no env, only the stdlib) compiles and matches the whole batch with
stdlib `re`, the very calls PEFT makes, and the kernel kills it when its CPU budget is
spent (a timer whose signal's default action is to terminate, which needs no Python
code to run); its memory is capped too. The parent only waits, without the GIL.

Not the `regex` package's `timeout=`: its compile is not covered by the timeout and
expands counted repeats, `(?:(?:(?:(?:a{65535}){65535}){65535}){65535})` (46
characters) exhausting memory while compiling; and its syntax is not `re`'s (fuzzy
`{e<=1}`, POSIX classes), so it would read some patterns unlike PEFT.

This file runs as that child script, so it imports nothing but the stdlib. Callers word
`PatternRejected` for their own audience (the registry's AdapterRejected, the
converter's AdapterConversionError).
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

MAX_PATTERN_CHARS = 512
# CPU seconds for one batch once the child is up: PEFT-style patterns take microseconds
# per module name, a catastrophic one would take minutes.
CPU_BUDGET_S = 1.0
# Wall-clock backstop for the whole child, start-up included, on a loaded machine.
_WALL_LIMIT_S = 30.0
_MEMORY_BYTES = 512 << 20

Mode = Literal["fullmatch", "pattern_key"]
Why = Literal["too_long", "counted_repeat", "invalid", "too_slow", "too_much_memory"]
# `{m,n}`, unescaped. vLLM reads rank_pattern/alpha_pattern with the `regex` package,
# which expands nested counted repeats at compile time: 46 characters of them exhaust
# its memory, in the engine process, while stdlib `re` (and so the check here) finds
# them harmless. No PEFT adapter needs them; refusing them protects every engine.
_COUNTED_REPEAT = re.compile(r"(?<!\\)\{\s*\d*\s*,?\s*\d*\s*\}")
_KILLED_BY_BUDGET = {-signal.SIGPROF, -signal.SIGXCPU, -signal.SIGKILL}


class PatternRejected(Exception):
    """A tenant's pattern cannot be used: too long, not a regex, or too costly to match.

    `pattern` is the offending one as the tenant wrote it; `detail` is `re`'s message
    for an invalid one."""

    def __init__(self, field: str, pattern: str, why: Why, detail: str = "") -> None:
        super().__init__(f"{field}: {pattern!r}: {why}{': ' + detail if detail else ''}")
        self.field = field
        self.pattern = pattern
        self.why = why
        self.detail = detail


def fullmatches(pattern: str, names: Iterable[str], field: str) -> set[str]:
    """The names `pattern` matches in full: PEFT's reading of a `target_modules` string."""
    first = _run("fullmatch", [pattern], list(names), field)
    return set(first)


def pattern_keys(keys: Sequence[str], names: Iterable[str], field: str) -> dict[str, str]:
    """For each name that any key matches, the first such key, matched as PEFT's
    `get_pattern_key` does (`re.match(rf"(.*\\.)?({key})$", name)`); unmatched names
    are left out."""
    keys = list(keys)
    first = _run("pattern_key", keys, list(names), field)
    return {name: keys[index] for name, index in first.items()}


# ---------------------------------------------------------------- the parent


def _run(mode: Mode, patterns: list[str], names: list[str], field: str) -> dict[str, int]:
    for pattern in patterns:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise PatternRejected(field, pattern, "too_long")
        if _COUNTED_REPEAT.search(pattern):  # linear: our own pattern, on at most 512 characters
            raise PatternRejected(field, pattern, "counted_repeat")
    if not patterns or not names:
        return {}
    job = json.dumps({"mode": mode, "patterns": patterns, "names": names})
    try:
        child = subprocess.run(
            [sys.executable, "-I", "-S", str(Path(__file__).resolve())],
            input=job.encode(), capture_output=True, timeout=_WALL_LIMIT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise PatternRejected(field, patterns[_last_started(exc.stdout)], "too_slow") from None
    lines = child.stdout.decode().splitlines()
    if child.returncode in _KILLED_BY_BUDGET:
        raise PatternRejected(field, patterns[_last_started(child.stdout)], "too_slow")
    if child.returncode != 0 or not lines:
        # Not the tenant's doing: the child could not run (or has a bug).
        tail = child.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"the tenant regex child failed (exit {child.returncode}): {' | '.join(tail)}")
    outcome = json.loads(lines[-1])
    if "invalid" in outcome:
        raise PatternRejected(field, patterns[outcome["invalid"]], "invalid", outcome["message"])
    if "memory" in outcome:
        raise PatternRejected(field, patterns[outcome["memory"]], "too_much_memory")
    return {name: int(index) for name, index in outcome["first"].items()}


def _last_started(stdout: bytes | None) -> int:
    """The pattern the child was on when it was stopped (its progress lines say)."""
    started = [json.loads(line)["start"] for line in (stdout or b"").decode().splitlines() if '"start"' in line]
    return started[-1] if started else 0


# ---------------------------------------------------------------- the child


def _child() -> None:
    _lower_limit(resource.RLIMIT_AS, _MEMORY_BYTES, _MEMORY_BYTES)
    job = json.load(sys.stdin)
    # A signal ignored or blocked in the parent stays so across exec: undo both, or the
    # timer would not kill. RLIMIT_CPU (SIGXCPU, then SIGKILL) backs it up, in whole
    # seconds counted from start-up.
    for stop in (signal.SIGPROF, signal.SIGXCPU):
        signal.signal(stop, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGPROF, signal.SIGXCPU})
    # Its budget is CPU time, so yielding to the serving processes costs it nothing.
    os.nice(10)
    soft = int(CPU_BUDGET_S) + 2
    _lower_limit(resource.RLIMIT_CPU, soft, soft + 1)
    # Started after start-up, so that a slow start on a busy machine spends none of it.
    signal.setitimer(signal.ITIMER_PROF, CPU_BUDGET_S)
    print(json.dumps(_first_matches(job["mode"], job["patterns"], job["names"])), flush=True)


def _lower_limit(kind: int, soft: int, hard: int) -> None:
    """Never above what the child inherited: raising a hard limit is refused."""
    _, inherited = resource.getrlimit(kind)
    if inherited != resource.RLIM_INFINITY:
        soft, hard = min(soft, inherited), min(hard, inherited)
    resource.setrlimit(kind, (soft, hard))


def _first_matches(mode: Mode, patterns: list[str], names: list[str]) -> dict[str, Any]:
    """Each name's first matching pattern (by index); patterns in order, so that the
    progress line printed before each one names the pattern a kill interrupts."""
    first: dict[str, int] = {}
    for index, pattern in enumerate(patterns):
        print(json.dumps({"start": index}), flush=True)
        try:
            match = _matcher(mode, pattern)
            for name in names:
                if name not in first and match(name):
                    first[name] = index
        except re.error as exc:
            return {"invalid": index, "message": _in_own_words(exc, pattern)}
        except (OverflowError, RecursionError, ValueError) as exc:
            return {"invalid": index, "message": str(exc)}
        except MemoryError:
            return {"memory": index}
    return {"first": first}


def _matcher(mode: Mode, pattern: str) -> Callable[[str], re.Match[str] | None]:
    """PEFT's own calls: `re.fullmatch(target_modules, name)` in check_target_module_exists,
    `re.match(rf"(.*\\.)?({key})$", name)` in get_pattern_key."""
    if mode == "fullmatch":
        return re.compile(pattern).fullmatch
    return re.compile(rf"(.*\.)?({pattern})$").match


def _in_own_words(exc: re.error, pattern: str) -> str:
    """re's message about the tenant's own text, not about PEFT's wrapper around a
    pattern key (whose positions and groups it would count)."""
    try:
        re.compile(pattern)
    except re.error as alone:
        return str(alone)
    return exc.msg


if __name__ == "__main__":
    _child()
