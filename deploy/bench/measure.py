"""What every benchmark run measures with: the journal of progress and failures, the error a
failed measurement raises, the agent's process as /proc shows it (CPU seconds, resident
memory), the kernel's tables as JSON, and polling for a state."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ..cluster import AgentExited
from ..demo import Progress
from ..lab import Lab, LabError

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROBES = str(Path(__file__).resolve().parent.parent / "probes.py")  # run in lab namespaces


class BenchError(RuntimeError):
    """One measurement failed; the message says which and why."""


# What a failed measurement raises: it is recorded and the run goes on.
FAILURES = (
    BenchError,
    LabError,
    AgentExited,
    TimeoutError,
    OSError,
    ValueError,
    KeyError,
    subprocess.SubprocessError,
)


class Journal:
    """A run's progress lines (`journal("...")`, with the time since the start) and its
    failed measurements, each one line in `errors`."""

    def __init__(self) -> None:
        self.progress = Progress()
        self.errors: list[str] = []

    def __call__(self, message: str) -> None:
        self.progress(message)

    def failed(self, what: str, e: BaseException) -> None:
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        line = f"{what}: {lines[0]}" + (f" … {lines[-1].strip()}" if len(lines) > 1 else "")
        self.errors.append(line)
        self.progress(f"FAILED {line}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads) and of its children, running or reaped, in
    seconds: the wireguard backend's datapath (wireguard-go, where the kernel has no
    WireGuard) is the agent's child, and its CPU is the agent's cost. A child that ends moves
    from the running ones to the reaped ones (cutime + cstime), so the sum never goes back."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    own = sum(int(f) for f in fields[11:15]) / CLK_TCK
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += (task / "children").read_text().split()
    for child in children:
        with contextlib.suppress(OSError, ValueError):
            own += cpu_seconds(int(child))
    return own


def rss_mb(pid: int) -> float:
    """The resident memory (VmRSS) of `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_burst_ms(pid: int, trigger: Callable[[], object], quiet: float = 0.3) -> float:
    """The CPU time `pid` spends after `trigger()` until it has been idle for `quiet` s (at
    most 60 s); /proc counts in clock ticks (10 ms)."""
    before = last = cpu_seconds(pid)
    trigger()
    changed = time.monotonic()
    deadline = changed + 60
    while time.monotonic() - changed < quiet and time.monotonic() < deadline:
        time.sleep(0.02)
        now = cpu_seconds(pid)
        if now != last:
            last, changed = now, time.monotonic()
    return round(1000 * (last - before), 1)


def kernel_table(lab: Lab, ns: str, *cmd: str, check: bool = True) -> list[dict]:
    """The entries `cmd` (an `ip -j ...` or `bridge -j ...` listing) prints in namespace `ns`;
    none when it prints nothing, or fails with `check` off (a device that is not there)."""
    out = lab.run(ns, *cmd, check=check).stdout
    return json.loads(out) if out.strip() else []


def poll(until: Callable[[], bool], timeout: float, step: float = 0.1) -> float | None:
    """Call `until()` every `step` s; the monotonic time it first returned true, None after
    `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return time.monotonic()
        time.sleep(step)
    return None
