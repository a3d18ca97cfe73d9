"""`deploy.lab.signal_group` on a plain child process: no namespace, no root (moved from
tests/e2e/test_lab.py, whose tests all need root)."""

from __future__ import annotations

import signal
import subprocess

from deploy.lab import signal_group


def test_signal_group_reaches_a_live_group_and_nothing_once_it_is_reaped() -> None:
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert signal_group(proc, signal.SIGTERM) is True
        assert proc.wait(5) == -signal.SIGTERM
        # reaped: its pid may be anyone's now, so the group is not signalled again
        assert signal_group(proc, signal.SIGKILL) is False
    finally:
        proc.kill()
        proc.wait()
