"""Exponential back-off with jitter (the one retry policy of the agent: etcd watch, lease
taking, renewal), and "log an outage once, its end once"."""

from __future__ import annotations

import asyncio
import logging
import random


class Backoff:
    def __init__(self, first: float = 0.1, cap: float = 4.0) -> None:
        self.first, self.cap, self.delay = first, cap, first

    def reset(self) -> None:
        self.delay = self.first

    def next(self) -> float:
        """The next wait: the current delay with ±20 % jitter; the delay then doubles."""
        wait = self.delay * random.uniform(0.8, 1.2)
        self.delay = min(self.cap, self.delay * 2)
        return wait

    async def sleep(self) -> None:
        await asyncio.sleep(self.next())


class Outage:
    """Logs the first failure of a run of failures and the recovery after it, nothing between."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.log, self.what, self.down = logger, what, False

    def failed(self, err: BaseException | str) -> None:
        if not self.down:
            self.down = True
            self.log.warning("%s failed: %s; retrying with back-off", self.what, err)

    def ok(self) -> None:
        if self.down:
            self.down = False
            self.log.info("%s recovered", self.what)
