"""How often the agent compares the whole kernel state with what it wants."""

import asyncio
import contextlib

import pytest

from flanneld.agent.daemon import Agent
from flanneld.core.options import Options
from flanneld.core.schedule import FULL_PASS_SHARE, full_pass_period


@pytest.mark.parametrize(
    ("interval", "last_full", "period"),
    [
        (10.0, 0.12, 10.0),  # host-gw, 1,000 peers: the flag rules
        (10.0, 0.5, 10.0),  # exactly the share
        (10.0, 2.2, 44.0),  # vxlan, 5,000 peers: spaced out
        (60.0, 2.2, 60.0),  # a long interval stays
        (0.5, 0.1, 2.0),
    ],
)
def test_full_passes_take_at_most_their_share_of_the_time(
    interval: float, last_full: float, period: float
) -> None:
    assert full_pass_period(interval, last_full) == pytest.approx(period)
    assert last_full / full_pass_period(interval, last_full) <= FULL_PASS_SHARE + 1e-9


class SlowFullPasses:
    """The agent's reconcile loop with the passes recorded instead of run: a full pass
    "takes" 1 s, so the next one is 20 s away; the backend's check answers `intact`."""

    def __init__(self) -> None:
        self.agent = Agent(Options(reconcile_interval=0.05), registry=None)  # type: ignore[arg-type]
        self.agent.backend = self  # type: ignore[assignment]
        self.agent.reconcile = self.reconcile  # type: ignore[method-assign]
        self.type_name = "fake"
        self.passes: list[bool] = []
        self.checks = 0
        self.state_intact = True

    async def reconcile(self, full: bool = True) -> None:
        self.passes.append(full)
        self.agent.last_reconcile_seconds = 1.0 if full else 0.001

    async def intact(self) -> bool:
        self.checks += 1
        return self.state_intact


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_between_spaced_full_passes_a_cheap_check_brings_the_next_one_forward() -> None:
    s = SlowFullPasses()
    loop_task = asyncio.create_task(s.agent.reconcile_loop())
    try:
        await until(lambda: s.passes == [True])  # the first full pass, then 20 s to the next
        await until(lambda: s.checks >= 3)  # checked every interval, nothing run
        assert s.passes == [True]
        s.agent._trigger.set()  # a peer event: an event pass at once
        await until(lambda: s.passes == [True, False])
        s.state_intact = False  # the vxlan device deleted, say
        await until(lambda: len(s.passes) == 3)
        assert s.passes == [True, False, True]
        s.state_intact = True
        s.agent._lease_changed = True  # a new subnet whose reconfiguration failed: retried
        await until(lambda: len(s.passes) == 4)
        assert s.passes == [True, False, True, True]
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task


async def test_at_small_scale_full_passes_run_every_interval_without_checks() -> None:
    s = SlowFullPasses()
    s.reconcile = None  # type: ignore[assignment]

    async def quick(full: bool = True) -> None:
        s.passes.append(full)
        s.agent.last_reconcile_seconds = 0.001

    s.agent.reconcile = quick  # type: ignore[method-assign]
    loop_task = asyncio.create_task(s.agent.reconcile_loop())
    try:
        await until(lambda: len(s.passes) >= 3)
        assert all(s.passes) and s.checks == 0
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
