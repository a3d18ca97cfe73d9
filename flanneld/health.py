"""The agent's HTTP endpoints: `/healthz` (alive), `/readyz` (503 until subnet.env is written),
`/status` (JSON for `flannelctl status`) and `/metrics` (Prometheus).

A few lines over asyncio streams, on the agent's loop, one request per connection, served on
`--healthz-ip:--healthz-port` when set and always on a unix socket in the state directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Response = tuple[int, str, bytes]  # status, content type, body
Handler = Callable[[], Awaitable[Response]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
TEXT = "text/plain; charset=utf-8"


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        routes: dict[str, Handler] | None = None,
    ) -> None:
        self.host, self.port, self.ready = host, port, ready
        self.routes = routes or {}
        self._servers: list[asyncio.Server] = []

    async def route(self, method: str, path: str) -> Response:
        if method != "GET":
            return 405, TEXT, b"only GET is served\n"
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, TEXT, b"flanneld is running\n"
        if path == "/readyz":
            if self.ready():
                return 200, TEXT, b"flanneld is ready\n"
            return 503, TEXT, b"flanneld is not ready\n"
        handler = self.routes.get(path)
        if handler is None:
            return 404, TEXT, b"not found\n"
        return await handler()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            if len(parts) >= 2:
                status, ctype, body = await self.route(parts[0], parts[1])
            else:
                status, ctype, body = 405, TEXT, b"bad request\n"
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:  # a failing handler must not take the agent down
            log.exception("HTTP handler failed")
        finally:
            writer.close()

    async def start(self) -> None:
        self._servers.append(await asyncio.start_server(self._handle, self.host, self.port))
        log.info("health server listening on %s:%d", self.host, self.port)

    async def start_unix(self, path: str) -> None:
        """Serve the same endpoints on a unix socket only root can open (mode 0600)."""
        if os.path.exists(path):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self._servers.append(await asyncio.start_unix_server(self._handle, path))
        finally:
            os.umask(old)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
