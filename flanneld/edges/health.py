"""The agent's HTTP endpoints, on the agent's asyncio loop, one GET per connection.

- TCP on `--healthz-ip:--healthz-port` (when the port is set): `/healthz` (alive), `/readyz`
  (503 until subnet.env is written) and `/metrics` (Prometheus). Whoever reaches the port may
  ask, so nothing served there lists peers or the etcd endpoint.
- The unix socket `<state-dir>/flanneld.sock` (mode 0600, root only): the same, and `/status`
  (JSON for `flannelctl status`).

Every request is hostile until it has proven otherwise (DESIGN.md principle 7):

- One deadline (`deadline`, 10 s) covers a whole connection: the request head, the handling and
  the writing of the answer. At the deadline the connection is cut, however steadily the client
  trickles bytes.
- The request line and headers together are at most `max_head` bytes (8 KiB), else 431. A
  request with a body (`Content-Length` other than 0, or `Transfer-Encoding`) is answered 400, a
  method other than GET 405, a malformed head 400; the connection is closed after every answer.
- Each listener holds at most `max_conns` connections (64). A connection beyond that displaces
  the oldest one still sending its request head, so idle clients cannot keep a health probe
  out; when every one is past its head (being answered), the newcomer is closed at once,
  unread. What is refused is counted in `rejected`, never logged per connection.
- `/status` makes the backend dump the kernel: requests share the computation in flight, and a
  new one starts no sooner than `status_interval` (1 s) after the last ended, so a client
  looping on the socket keeps the dump busy at most a fraction of the time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]  # status, content type, body
Handler = Callable[[], Awaitable[Response]]

TEXT = "text/plain; charset=utf-8"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
DEADLINE = 10.0  # seconds for a whole connection
MAX_HEAD = 8192  # bytes of request line and headers
MAX_CONNS = 64  # connections per listener
STATUS_INTERVAL = 1.0  # seconds between the end of one /status computation and the next


class _Listener:
    """One listening socket: its routes and its connections."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.server: asyncio.Server | None = None
        self.reading: dict[asyncio.StreamWriter, None] = {}  # sending their head, oldest first
        self.answering: set[asyncio.StreamWriter] = set()


class HealthServer:
    def __init__(
        self,
        ready: Callable[[], bool],
        status: Handler,
        metrics: Handler,
        *,
        deadline: float = DEADLINE,
        max_head: int = MAX_HEAD,
        max_conns: int = MAX_CONNS,
        status_interval: float = STATUS_INTERVAL,
    ) -> None:
        self.ready = ready
        self._status, self._metrics = status, metrics
        self.deadline, self.max_head, self.max_conns = deadline, max_head, max_conns
        self.status_interval = status_interval
        self.rejected: Counter[str] = Counter()  # evicted, full, deadline, oversized, malformed
        self._listeners: list[_Listener] = []
        self._status_task: asyncio.Task[Response] | None = None
        self._status_done = float("-inf")  # loop time the last /status computation ended

    # -- endpoints -----------------------------------------------------------------------------
    async def _healthz(self) -> Response:
        return 200, TEXT, b"flanneld is running\n"

    async def _readyz(self) -> Response:
        if self.ready():
            return 200, TEXT, b"flanneld is ready\n"
        return 503, TEXT, b"flanneld is not ready\n"

    async def _shared_status(self) -> Response:
        if self._status_task is None:
            self._status_task = asyncio.create_task(self._compute_status())
        return await asyncio.shield(self._status_task)

    async def _compute_status(self) -> Response:
        loop = asyncio.get_running_loop()
        try:
            delay = self._status_done + self.status_interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            return await self._status()
        finally:
            self._status_done = loop.time()
            self._status_task = None

    # -- listeners -----------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> int:
        """Serve /healthz, /readyz and /metrics on TCP; the port bound (for port 0)."""
        listener = self._listener({"/metrics": self._metrics})
        listener.server = await asyncio.start_server(
            lambda r, w: self._serve(listener, r, w),
            host,
            port,
            limit=self.max_head,
            backlog=1024,  # a burst of connects waits in the kernel instead of losing its SYNs
        )
        bound = listener.server.sockets[0].getsockname()[1]
        log.info("health server listening on %s:%d", host, bound)
        return bound

    async def start_unix(self, path: str) -> None:
        """Serve the TCP endpoints and /status on a unix socket only root can open (0600)."""
        listener = self._listener({"/metrics": self._metrics, "/status": self._shared_status})
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            listener.server = await asyncio.start_unix_server(
                lambda r, w: self._serve(listener, r, w), path, limit=self.max_head
            )
        finally:
            os.umask(old)

    def _listener(self, routes: dict[str, Handler]) -> _Listener:
        listener = _Listener({"/healthz": self._healthz, "/readyz": self._readyz, **routes})
        self._listeners.append(listener)
        return listener

    async def stop(self) -> None:
        """Stop listening and cut every open connection."""
        for listener in self._listeners:
            if listener.server is not None:
                listener.server.close()
            for writer in (*listener.reading, *listener.answering):
                writer.transport.abort()
        self._listeners.clear()
        if self._status_task is not None:
            self._status_task.cancel()

    # -- one connection ------------------------------------------------------------------------
    async def _serve(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(listener.reading) + len(listener.answering) >= self.max_conns:
            if not listener.reading:
                self.rejected["full"] += 1
                writer.transport.abort()
                return
            oldest = next(iter(listener.reading))
            del listener.reading[oldest]
            oldest.transport.abort()  # its reader sees the end of the stream
            self.rejected["evicted"] += 1
        listener.reading[writer] = None
        try:
            async with asyncio.timeout(self.deadline):
                request = await self._read_request(reader)
                listener.reading.pop(writer, None)
                if request is None or writer.transport.is_closing():  # closing: evicted
                    return
                listener.answering.add(writer)
                if isinstance(request, str):
                    request = await self._route(listener, request)
                status, ctype, body = request
                allow = "Allow: GET\r\n" if status == 405 else ""
                writer.write(
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n{allow}"
                    f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except TimeoutError:
            self.rejected["deadline"] += 1
        except ConnectionError:
            pass
        except asyncio.CancelledError:  # stop() or the loop's end; Python 3.11's stream
            pass  # callback would choke on a cancelled task (it asks for its exception)
        finally:
            listener.reading.pop(writer, None)
            listener.answering.discard(writer)
            writer.transport.abort()  # a no-op once closed; cuts one that did not finish

    async def _read_request(self, reader: asyncio.StreamReader) -> str | Response | None:
        """The path of a valid GET, an answer refusing the request, or None when the client
        closed before its head was whole."""
        lines: list[str] = []
        size = 0
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # one line longer than the reader's limit, max_head
                size = self.max_head + 1
            else:
                size += len(line)
            if size > self.max_head:
                self.rejected["oversized"] += 1
                return 431, TEXT, b"request line and headers too large\n"
            if not line.endswith(b"\n"):
                return None
            line = line.rstrip(b"\r\n")
            if not line:
                break
            lines.append(line.decode("latin-1"))
        answer = _parse(lines)
        if not isinstance(answer, str):
            self.rejected["malformed"] += 1
        return answer

    async def _route(self, listener: _Listener, path: str) -> Response:
        handler = listener.routes.get(path)
        if handler is None:
            return 404, TEXT, b"not found\n"
        try:
            return await handler()
        except Exception:  # a failing handler must not take the agent down
            log.exception("HTTP handler for %s failed", path)
            return 500, TEXT, b"internal error\n"


def _parse(lines: list[str]) -> str | Response:
    """The path of a GET without a body, or the answer refusing the request."""
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or not parts[1].startswith("/") or not parts[2].startswith("HTTP/1."):
        return 400, TEXT, b"bad request line\n"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return 400, TEXT, b"bad header line\n"
        name = name.lower()
        if name in ("content-length", "transfer-encoding") and name in headers:
            return 400, TEXT, b"repeated body header\n"
        headers[name] = value.strip()
    if parts[0] != "GET":
        return 405, TEXT, b"only GET is served\n"
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        return 400, TEXT, b"no request body is accepted\n"
    return parts[1].split("?", 1)[0]
