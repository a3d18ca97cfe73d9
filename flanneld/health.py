"""The health server: `GET /healthz` (alive) and `GET /readyz` (503 until subnet.env is written).

A few lines over `asyncio.start_server`; it runs on the agent's loop and answers one request
per connection, as probes do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    def __init__(self, host: str, port: int, ready: Callable[[], bool]) -> None:
        self.host, self.port, self.ready = host, port, ready
        self._server: asyncio.Server | None = None

    def route(self, method: str, path: str) -> tuple[int, str]:
        if method != "GET":
            return 405, "only GET is served\n"
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, "flanneld is running\n"
        if path == "/readyz":
            return (
                (200, "flanneld is ready\n") if self.ready() else (503, "flanneld is not ready\n")
            )
        return 404, "not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            status, body = self.route(*parts[:2]) if len(parts) >= 2 else (405, "bad request\n")
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("health server listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
