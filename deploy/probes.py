"""Small programs the benchmark (deploy.benchmark) runs inside lab namespaces.

Run as `python -I deploy/probes.py COMMAND ...` (standalone: no import of the project, so
they start fast in any namespace):

  rr-server CPU PORT TIMEOUT    accept one TCP connection and echo 64-byte messages until EOF
  rr-client CPU HOST PORT N WARMUP TIMEOUT
                                N timed round trips of a 64-byte message on one connection
                                (after WARMUP untimed ones); prints the RTTs in ns as JSON
  put ENDPOINT TTL [LEASE]      read `key<TAB>value` lines from stdin and write them into etcd
                                under one new etcd lease of TTL s (or the existing LEASE), in
                                transactions of TXN_OPS puts; prints JSON: the lease id and
                                the monotonic times of the first send and the last commit

Every one is bounded: socket timeouts, an overall deadline, a fixed count. The two ends of
the request/response test run pinned to the CPU given (modulo the CPUs there are): on a small
machine the round trip otherwise swings by tens of µs with whether the scheduler happens to
put both ends on one CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time

MESSAGE = 64  # bytes per request and per response
TXN_OPS = 128  # etcd's default --max-txn-ops
TXN_PARALLEL = 8


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _pin(cpu: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def _listen(port: int) -> socket.socket:
    """A listening socket for both families (the benchmark's IPv6 rows too), or IPv4 alone
    where the namespace has no IPv6."""
    try:
        return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    except OSError:
        return socket.create_server(("0.0.0.0", port))


def rr_server(port: int, timeout: float) -> int:
    with _listen(port) as srv:
        srv.settimeout(timeout)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while len(msg := _recv_exactly(conn, MESSAGE)) == MESSAGE:
                conn.sendall(msg)
    return 0


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """Connect, retrying while the server is not listening yet, for up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=1.0)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def rr_client(host: str, port: int, count: int, warmup: int, timeout: float) -> int:
    rtts: list[int] = []
    msg = bytes(MESSAGE)
    deadline = time.monotonic() + timeout
    with _connect(host, port, min(timeout, 5.0)) as sock:
        sock.settimeout(2.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(warmup + count):
            t0 = time.perf_counter_ns()
            sock.sendall(msg)
            if len(_recv_exactly(sock, MESSAGE)) != MESSAGE:
                raise ConnectionError("the server closed the connection")
            if i >= warmup:
                rtts.append(time.perf_counter_ns() - t0)
            if time.monotonic() > deadline:
                break
    print(json.dumps(rtts))
    return 0


async def _put(
    endpoint: str, ttl: int, lease: int | None, pairs: list[tuple[bytes, bytes]]
) -> dict[str, float]:
    import aetcd  # only this command needs the etcd client

    host, _, port = endpoint.removeprefix("http://").partition(":")
    async with aetcd.Client(host=host, port=int(port or 2379), timeout=10) as client:
        if lease is None:
            lease = (await client.lease(ttl)).id
        gate = asyncio.Semaphore(TXN_PARALLEL)

        async def txn(chunk: list[tuple[bytes, bytes]]) -> None:
            async with gate:
                ops = [client.transactions.put(k, v, lease=lease) for k, v in chunk]
                await client.transaction(compare=[], success=ops, failure=[])

        chunks = [pairs[i : i + TXN_OPS] for i in range(0, len(pairs), TXN_OPS)]
        first = time.monotonic()
        await asyncio.gather(*(txn(c) for c in chunks))
        return {"lease": lease, "first": first, "last": time.monotonic()}


def put(endpoint: str, ttl: int, lease: int | None) -> int:
    pairs = []
    for line in sys.stdin:
        if line.strip():
            key, _, value = line.rstrip("\n").partition("\t")
            pairs.append((key.encode(), value.encode()))
    print(json.dumps(asyncio.run(asyncio.wait_for(_put(endpoint, ttl, lease, pairs), 120))))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probes.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("rr-server")
    srv.add_argument("cpu", type=int)
    srv.add_argument("port", type=int)
    srv.add_argument("timeout", type=float)
    cli = sub.add_parser("rr-client")
    cli.add_argument("cpu", type=int)
    cli.add_argument("host")
    cli.add_argument("port", type=int)
    cli.add_argument("count", type=int)
    cli.add_argument("warmup", type=int)
    cli.add_argument("timeout", type=float)
    p = sub.add_parser("put")
    p.add_argument("endpoint")
    p.add_argument("ttl", type=int)
    p.add_argument("lease", type=int, nargs="?")
    args = parser.parse_args(argv)
    if args.command == "rr-server":
        _pin(args.cpu)
        return rr_server(args.port, args.timeout)
    if args.command == "rr-client":
        _pin(args.cpu)
        return rr_client(args.host, args.port, args.count, args.warmup, args.timeout)
    return put(args.endpoint, args.ttl, args.lease)


if __name__ == "__main__":
    sys.exit(main())
