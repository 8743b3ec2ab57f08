"""How `run.py` runs each part's command: in its own process group with a timeout (on expiry the whole group is
stopped, the cost scripts' memory subprocesses too, so one hang cannot eat the run's budget), its output streamed to
the run's log and kept for the part's log tail; and the budget those timeouts come from."""

import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass


TAIL_CHARS = 3000


@dataclass
class Outcome:
    returncode: int | None  # None when stopped at the timeout
    seconds: float
    output: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, chars: int = TAIL_CHARS) -> str:
        return self.output[-chars:]


def run_command(command: list[str], *, env: dict, timeout_s: float, log, prefix: str, cwd: str) -> Outcome:
    """Runs `command`; every output line goes to `log` with `prefix`. Stops the process group after `timeout_s`."""
    log(f"$ {shlex.join(command)}  (timeout {timeout_s:.0f} s)")
    tic = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group, stopped as one at the timeout
    )
    lines = []

    def read():
        for line in process.stdout:
            lines.append(line)
            log(f"{prefix} {line.rstrip()}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        returncode = None
        _stop_group(process)
        log(f"{prefix} stopped after {timeout_s:.0f} s (timeout)")
    reader.join(timeout=10)
    return Outcome(returncode, time.perf_counter() - tic, "".join(lines))


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the part's process group, SIGKILL to what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Budget:
    """The run's wall-clock budget shared among the parts. Each part is capped at its own share (`caps`), plus what
    the parts before it left unused; the shares of the parts still to come are kept for them."""

    def __init__(self, total_s: float, caps: dict[str, float]):
        self.deadline = time.monotonic() + total_s
        self.caps = dict(caps)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeout_for(self, part: str) -> float:
        names = list(self.caps)
        later = sum(self.caps[name] for name in names[names.index(part) + 1 :])
        return max(min(self.caps[part], self.remaining()), self.remaining() - later)
