import asyncio

from flanneld.health import HealthServer


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_healthz_and_readyz_follow_readiness():
    ready = False
    srv = HealthServer("127.0.0.1", 0, lambda: ready)
    await srv.start()
    port = srv._servers[0].sockets[0].getsockname()[1]
    try:
        assert await get(port, "/healthz") == (200, "flanneld is running\n")
        assert (await get(port, "/readyz"))[0] == 503
        ready = True
        assert await get(port, "/readyz") == (200, "flanneld is ready\n")
        assert (await get(port, "/nope"))[0] == 404
        assert (await get(port, "/healthz", "POST"))[0] == 405
    finally:
        await srv.stop()
