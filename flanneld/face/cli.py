"""`flanneld`: the command line, logging, and the process around the agent: the etcd
registry, the health and status listeners, signals and the exit status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from flanneld import __version__
from flanneld.agent.daemon import Agent, FatalError
from flanneld.core.options import SOCKET_NAME, FlagError, Options, parse_options
from flanneld.edges import heap, sdnotify
from flanneld.edges.health import HealthServer, Response
from flanneld.edges.registry import EtcdConfigError, EtcdRegistry, TLSFiles
from flanneld.face import metrics

log = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; times in UTC."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_options(argv)
    except FlagError as e:
        print(f"flanneld: {e}", file=sys.stderr)
        return 2
    if opts.version:
        print(__version__, file=sys.stderr)
        return 0
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if opts.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=opts.log_level.upper(), handlers=[handler])
    if "MALLOC_ARENA_MAX" not in os.environ:  # one the operator set wins
        heap.limit_arenas(heap.ARENAS)
    return asyncio.run(run(opts))


async def run(opts: Options) -> int:
    try:
        registry = EtcdRegistry(
            opts.etcd_endpoints.split(","),
            opts.etcd_prefix,
            TLSFiles(opts.etcd_cafile, opts.etcd_certfile, opts.etcd_keyfile),
            opts.etcd_username,
            opts.etcd_password,
        )
    except EtcdConfigError as e:
        log.error("%s", e)
        return 2
    agent = Agent(opts, registry)

    async def status() -> Response:
        return 200, "application/json", json.dumps(await agent.status(), indent=1).encode()

    async def metrics_page() -> Response:
        return 200, metrics.CONTENT_TYPE, metrics.exposition(agent.stats())

    health = HealthServer(lambda: agent.ready, status, metrics_page)  # /status: unix socket only
    try:
        Path(opts.state_dir).mkdir(parents=True, exist_ok=True)
        await health.start_unix(str(Path(opts.state_dir) / SOCKET_NAME))
    except OSError as e:
        log.warning("no status socket in %s (%s); flannelctl status needs it", opts.state_dir, e)
    if opts.healthz_port:
        try:
            await health.start(opts.healthz_ip, opts.healthz_port)
        except OSError as e:
            log.error(
                "cannot listen on %s:%d (%s); fix --healthz-ip/--healthz-port",
                opts.healthz_ip,
                opts.healthz_port,
                e.strerror,
            )
            return 2

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    main = asyncio.create_task(agent.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if main.done():
        exc = main.exception()
        if isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        if isinstance(exc, FatalError):
            log.error("%s", exc)
            code = 1
        elif exc is not None:
            log.error("agent failed", exc_info=exc)
            code = 1
    else:
        log.info(
            "stopping: kernel state and lease %s stay in place",
            agent.leases.lease.key if agent.leases and agent.leases.lease else "-",
        )
        sdnotify.notify("STOPPING=1")
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(main, 1.0)
    stopper.cancel()
    if agent.backend is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(agent.backend.close(), 0.5)
    await health.stop()
    await registry.close()
    log.info("exiting cleanly" if code == 0 else "exiting")
    return code


if __name__ == "__main__":
    sys.exit(main())
