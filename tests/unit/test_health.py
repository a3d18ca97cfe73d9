"""The HTTP endpoints against a real HealthServer on 127.0.0.1 and a unix socket in tmp_path:
which listener serves what, and what a hostile client (slow, oversized, with a body, one of
thousands of idle connections, or looping on /status) can and cannot do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
import time

import pytest

from flanneld.edges.health import MAX_CONNS, HealthServer, Response

Addr = tuple[str, int] | str  # TCP on 127.0.0.1, or a unix socket path


async def exchange(addr: Addr, data: bytes, timeout: float = 5.0) -> tuple[int | None, bytes]:
    """Send `data`, read until the server closes: (status, body); status None when the server
    closed without an answer. Fails if the server keeps the connection open for `timeout` s."""
    if isinstance(addr, str):
        reader, writer = await asyncio.open_unix_connection(addr)
    else:
        reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), timeout)
    except (ConnectionResetError, BrokenPipeError):
        answer = b""
    finally:
        writer.close()
    if not answer:
        return None, b""
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def get(addr: Addr, path: str) -> tuple[int | None, bytes]:
    return await exchange(addr, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


class Agent:
    """What the daemon hands the server: readiness, a /status and a /metrics handler."""

    def __init__(self) -> None:
        self.ready = False
        self.status_calls = 0
        self.status_seconds = 0.0
        self.metrics_gate: asyncio.Event | None = None  # /metrics waits for it when set

    async def status(self) -> Response:
        self.status_calls += 1
        await asyncio.sleep(self.status_seconds)
        return 200, "application/json", b'{"peers": ["192.0.2.12"]}'

    async def metrics(self) -> Response:
        if self.metrics_gate is not None:
            await self.metrics_gate.wait()
        return 200, "text/plain", b"flannel_ready 0\n"


@pytest.fixture
async def serve(tmp_path):
    """serve(**options) -> (agent, server, TCP address, unix socket path); stopped at the end."""
    servers: list[HealthServer] = []

    async def start(**options):
        agent = Agent()
        srv = HealthServer(lambda: agent.ready, agent.status, agent.metrics, **options)
        servers.append(srv)
        port = await srv.start("127.0.0.1", 0)
        path = str(tmp_path / "flanneld.sock")
        await srv.start_unix(path)
        return agent, srv, ("127.0.0.1", port), path

    yield start
    for srv in servers:
        await srv.stop()


async def test_healthz_and_readyz_follow_readiness(serve):
    agent, _, tcp, _ = await serve()
    assert await get(tcp, "/healthz") == (200, b"flanneld is running\n")
    assert (await get(tcp, "/readyz"))[0] == 503
    agent.ready = True
    assert await get(tcp, "/readyz") == (200, b"flanneld is ready\n")
    assert (await get(tcp, "/nope"))[0] == 404
    assert (await exchange(tcp, b"POST /healthz HTTP/1.1\r\n\r\n"))[0] == 405
    assert (await exchange(tcp, b"GET /healthz\r\n\r\n"))[0] == 400


async def test_status_is_served_on_the_unix_socket_only(serve):
    _, _, tcp, unix = await serve()
    assert (await get(tcp, "/status"))[0] == 404
    assert (await get(tcp, "/status?x=1"))[0] == 404
    assert await get(unix, "/status") == (200, b'{"peers": ["192.0.2.12"]}')
    assert (await get(tcp, "/metrics"))[0] == 200  # Prometheus scrapes the TCP port
    assert (await get(unix, "/metrics"))[0] == 200
    assert (await get(unix, "/healthz"))[0] == 200
    assert os.stat(unix).st_mode & 0o777 == 0o600


async def test_a_slow_loris_is_cut_at_the_deadline(serve):
    """A header line every second: each line is prompt, the whole never ends."""
    _, _, tcp, _ = await serve(deadline=3.0)
    reader, writer = await asyncio.open_connection(*tcp)
    start = time.monotonic()
    closed_after = None
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        for i in range(8):  # 8 s at most, well past the deadline
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                    closed_after = time.monotonic() - start
                    break
            with contextlib.suppress(ConnectionError):
                writer.write(f"X-Drip-{i}: still here\r\n".encode())
    except ConnectionResetError:
        closed_after = time.monotonic() - start
    finally:
        writer.close()
    assert closed_after is not None, "the connection was still open after 8 s"
    assert 2.5 < closed_after < 5.0


async def test_a_handler_that_hangs_is_cut_at_the_deadline(serve):
    agent, _, tcp, _ = await serve(deadline=1.0)
    agent.metrics_gate = asyncio.Event()  # never set
    start = time.monotonic()
    assert await exchange(tcp, b"GET /metrics HTTP/1.1\r\n\r\n", timeout=4.0) == (None, b"")
    assert 0.8 < time.monotonic() - start < 3.0


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",  # one long line
        b"GET /healthz HTTP/1.1\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 90) for i in range(100)),
        b"GET /" + b"c" * 70000 + b" HTTP/1.1\r\n\r\n",  # beyond any line buffer
    ],
    ids=["long-header", "many-headers", "huge-request-line"],
)
async def test_an_oversized_head_is_refused(serve, head):
    _, srv, tcp, _ = await serve()
    status, _ = await exchange(tcp, head + b"\r\n")
    assert status in (431, 400, None)  # refused: an error answer, or closed
    assert (await get(tcp, "/healthz"))[0] == 200  # and the server goes on


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_a_request_body_is_refused(serve, request_bytes):
    _, _, tcp, _ = await serve()
    assert (await exchange(tcp, request_bytes))[0] == 400


async def test_a_full_listener_closes_newcomers_unread(serve):
    """Every slot busy answering (a /metrics held open): a new connection is closed at once,
    whatever it sends; the held ones are answered when their handler returns."""
    agent, _, tcp, _ = await serve(max_conns=4)
    agent.metrics_gate = asyncio.Event()
    held = [asyncio.create_task(get(tcp, "/metrics")) for _ in range(4)]
    await asyncio.sleep(0.3)
    start = time.monotonic()
    assert await get(tcp, "/healthz") == (None, b"")
    assert time.monotonic() - start < 1.0
    agent.metrics_gate.set()
    assert [status for status, _ in await asyncio.gather(*held)] == [200] * 4


async def test_concurrent_status_requests_share_one_computation(serve):
    agent, _, _, unix = await serve()
    agent.status_seconds = 0.2
    answers = await asyncio.gather(*(get(unix, "/status") for _ in range(20)))
    assert [status for status, _ in answers] == [200] * 20
    assert agent.status_calls == 1


async def test_a_client_looping_on_status_keeps_the_dump_mostly_idle(serve):
    """Back-to-back /status requests for 2.5 s: each is answered, but the kernel dump (0.1 s
    here) starts at most once a second after the previous one ended."""
    agent, _, _, unix = await serve()
    agent.status_seconds = 0.1
    start = time.monotonic()
    answered = 0
    while time.monotonic() < start + 2.5:
        assert (await get(unix, "/status"))[0] == 200
        answered += 1
    elapsed = time.monotonic() - start
    assert answered >= 2
    assert agent.status_calls <= 1 + elapsed / 1.0  # one at 0 s, then one per 1.1 s at most


IDLE_CLIENT = r"""
import contextlib, select, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(count):
    s = socket.socket()
    socks.append(s)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    if i % 2:  # a request line, and nothing more
        with contextlib.suppress(OSError):
            s.send(b"GET /healthz HTTP/1.1\r\n")
    if i % 100 == 99:
        time.sleep(0.01)  # idle connections, not a connect flood: let the server accept
print(len(socks), flush=True)
select.select([sys.stdin], [], [], 60)  # until the test closes stdin, 60 s at most
"""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_idle_connections_neither_starve_healthz_nor_the_loop(serve):
    """2,000 idle connections (from another process): /healthz still answers within 1 s, the
    server holds at most MAX_CONNS of them (its file descriptors stay bounded), and the loop is
    never blocked for long (the lag of a 10 ms periodic task stands in for a reconcile)."""
    count = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = open_fds() + count + 256  # the client's sockets, or an unbounded server's
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    _, _, tcp, _ = await serve()
    baseline = open_fds()
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)

    ticker = asyncio.create_task(tick())
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        IDLE_CLIENT,
        str(tcp[1]),
        str(count),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert client.stdout and client.stdin
        opened = await asyncio.wait_for(client.stdout.readline(), 30)
        assert opened == f"{count}\n".encode()
        await asyncio.sleep(0.5)  # the server has accepted and sorted them all
        for _ in range(3):
            start = time.monotonic()
            assert (await get(tcp, "/healthz"))[0] == 200
            assert time.monotonic() - start < 1.0
        held = open_fds() - baseline
        assert held <= MAX_CONNS + 4, f"the server holds {held} connections"
    finally:
        done.set()
        await ticker
        if client.stdin:
            client.stdin.close()
        try:
            await asyncio.wait_for(client.wait(), 10)
        except TimeoutError:
            client.kill()
            await client.wait()
        if soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # a stalled loop would lag for seconds (the old server held every connection until its
    # 5 s timeouts); the bound leaves room for a machine busy with other work
    assert len(lags) > 20 and max(lags) < 1.0, f"loop lag up to {max(lags):.3f} s"
