"""A gRPC call cancelled under a task (its channel closed by another task) raises
CancelledError into that task, which then looks cancelled: in a TaskGroup it ends silently.
The registry turns such a CancelledError into a connection failure, and the agent's loops
turn any unexpected end into FatalError; a real cancellation still cancels."""

from __future__ import annotations

import asyncio

import pytest

from flanneld.agent.daemon import FatalError, essential
from flanneld.edges.registry import EtcdRegistry, EtcdUnavailable


async def test_a_call_cancelled_under_the_task_is_a_connection_failure():
    reg = EtcdRegistry(["http://127.0.0.1:9"])  # never dialled: the op below fails first

    async def op(client):
        raise asyncio.CancelledError  # what awaiting a call on a closed channel raises

    with pytest.raises(EtcdUnavailable, match="cancelled"):
        await reg.call(op)
    assert reg.errors == 1
    await reg.close()


async def test_a_cancelled_task_stays_cancelled_inside_a_call():
    reg = EtcdRegistry(["http://127.0.0.1:9"])
    started = asyncio.Event()

    async def op(client):
        started.set()
        await asyncio.sleep(60)

    task = asyncio.create_task(reg.call(op))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reg.errors == 0
    await reg.close()


async def test_a_failure_on_a_replaced_connection_keeps_the_new_one():
    reg = EtcdRegistry(["http://127.0.0.1:9", "http://127.0.0.1:10"])
    seen = []

    async def op(client):
        seen.append(client)
        return "ok"

    await reg.call(op)
    first = seen[-1]
    await reg.fail_over(first)  # the first caller's failure: next endpoint, new connection
    await reg.call(op)
    second = seen[-1]
    assert second is not first and reg.endpoint.port == 10
    await reg.fail_over(first)  # a second, late failure seen on the old connection
    await reg.call(op)
    assert seen[-1] is second and reg.endpoint.port == 10
    await reg.close()


@pytest.mark.parametrize(
    "body, message",
    [
        ("cancel", "cancelled from inside"),
        ("return", "stopped"),
    ],
)
async def test_an_agent_loop_that_ends_stops_the_agent(body, message):
    async def loop():
        await asyncio.sleep(0)
        if body == "cancel":
            raise asyncio.CancelledError
        return None

    with pytest.raises(ExceptionGroup) as info:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(essential("peer watch", loop()))
            tg.create_task(asyncio.sleep(60))  # another loop, stopped by the failure
    [err] = info.value.exceptions
    assert isinstance(err, FatalError) and "peer watch" in str(err) and message in str(err)


async def test_stopping_the_agent_still_cancels_its_loops():
    task = asyncio.create_task(essential("peer watch", asyncio.sleep(60)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
