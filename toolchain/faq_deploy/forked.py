"""Work done in a forked copy of this process: the copy starts with our imports (a fresh interpreter
spent 7 of the builder's 10 s on the default model importing torch, transformers and onnx again),
and whatever it allocates goes back to the system when it exits.

The kernel counts a forked child's resident pages with the pages it shares with us, so its
RUSAGE_CHILDREN peak would count our own memory twice. The child measures instead what it added:
its resident growth at its peak, plus the shared pages it had copied on write by its end. `added_peak`
hands that to the build's stage accounting.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

_added: list[int] = []  # bytes each forked run added at its peak, in order


def _kilobytes(path: str, *fields: str) -> int:
    with open(path) as handle:
        return sum(int(line.split()[1]) for line in handle if line.startswith(fields))


def run_forked(work: Callable[[], None], log: Path) -> str | None:
    """Run `work` in a forked child whose stdout and stderr go to `log` (a failure's traceback too).
    None when it returned, else why not in one line. Where /proc tells (Linux), the memory it added
    is kept for `added_peak`."""
    result = log.with_suffix(".json")
    pid = os.fork()
    if pid == 0:  # the child: it never returns into the caller's code
        code = 1
        try:
            _child(work, log, result)
            code = 0
        except BaseException as exc:
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0]
            result.write_text(json.dumps({"error": f"{type(exc).__name__}: {first}".rstrip(": ")}))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    answer = json.loads(result.read_text()) if result.exists() else {}
    result.unlink(missing_ok=True)
    if "added_bytes" in answer:
        _added.append(answer["added_bytes"])
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # SIGKILL is most often the kernel's out-of-memory killer
        return f"killed by signal {-code}" + (" (out of memory?)" if code == -signal.SIGKILL else "")
    return answer.get("error", f"exited with {code}") if code else None


def _child(work: Callable[[], None], log: Path, result: Path) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # new stream objects: a lock that another thread held at the fork would stay held in the child
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115
    measured = Path("/proc/self/smaps_rollup").exists()
    if measured:
        start = _kilobytes("/proc/self/status", "VmRSS:")
        with suppress(OSError):  # VmHWM restarts from here (else it holds the child's start)
            Path("/proc/self/clear_refs").write_text("5")
    work()
    if measured:
        peak, end = _kilobytes("/proc/self/status", "VmHWM:"), _kilobytes("/proc/self/status", "VmRSS:")
        private = _kilobytes("/proc/self/smaps_rollup", "Private_Clean:", "Private_Dirty:")
        result.write_text(json.dumps({"added_bytes": (peak - start + max(0, private - (end - start))) * 1024}))


def runs() -> int:
    """How many forked runs have reported their memory so far (a mark for `added_peak`)."""
    return len(_added)


def added_peak(since: int) -> int | None:
    """The most any forked run after mark `since` added, or None when none ran."""
    return max(_added[since:], default=None)
