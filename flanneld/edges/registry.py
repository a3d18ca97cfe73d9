"""etcd I/O: the network config, the subnet leases and the watch on them.

A thin layer over `aetcd` (etcd v3 API): endpoint fail-over across `--etcd-endpoints`, TLS
and user/password auth, and conversion of key/values into `Lease` objects. No policy here:
retries, back-off and decisions live in the lease manager and the peer watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import exceptions as etcd_exc
from aetcd import rpc

from flanneld.core.errors import InputError, StateError
from flanneld.core.lease import Lease, LeaseAttrs, RecordError
from flanneld.core.peers import Rejected, Snapshot, WatchEvent
from flanneld.core.subnets import ident_of, parse_key, subnet_key

log = logging.getLogger(__name__)
T = TypeVar("T")

RPC_TIMEOUT = 5  # seconds; etcd answers in milliseconds, a hang means the member is gone
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.keepalive_time_ms": 10000,
    "grpc.keepalive_timeout_ms": 5000,
}


class EtcdUnavailable(StateError):
    """No endpoint answered; the message lists them."""


class EtcdConfigError(InputError):
    """An endpoint or credential option is wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    secure: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        u = urlsplit(url if "://" in url else f"http://{url}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise EtcdConfigError(
                f"--etcd-endpoints: {url!r} is not an http(s)://host:port URL; "
                "write it like http://127.0.0.1:2379"
            )
        try:
            port = u.port or 2379
        except ValueError:
            raise EtcdConfigError(f"--etcd-endpoints: {url!r} has an invalid port") from None
        return cls(u.hostname, port, u.scheme == "https")

    def __str__(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class TLSFiles:
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str, flag: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise EtcdConfigError(
                    f"{flag}: cannot read {path} ({e.strerror}); fix the path"
                ) from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.cafile, "--etcd-cafile"),
            private_key=read(self.keyfile, "--etcd-keyfile"),
            certificate_chain=read(self.certfile, "--etcd-certfile"),
        )


class _Client(aetcd.Client):
    """aetcd's client, with a TLS channel when credentials are given (aetcd opens plain ones)."""

    def __init__(self, *args: Any, credentials: grpc.ChannelCredentials | None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None or self._connected.is_set():
            return await super().connect()
        # aetcd's connect() with the channel made secure; everything else is as aetcd does it.
        target = f"{self._host}:{self._port}"
        self.channel = rpc.secure_channel(target, self._credentials, options=self._options.items())
        try:
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                req = rpc.AuthenticateRequest(name=self._username, password=self._password)
                resp = await self.auth_stub.Authenticate(req, timeout=self._timeout)
                self.metadata = (("token", resp.token),)
        except rpc.AioRpcError as e:
            await self.channel.close()
            self._init_channel_attrs()
            etcd_exc._handle_exception(e)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


_TRANSIENT = (
    etcd_exc.ConnectionFailedError,
    etcd_exc.ConnectionTimeoutError,
    etcd_exc.InternalError,
    etcd_exc.WatchTimeoutError,
    etcd_exc.UnauthenticatedError,  # an expired auth token: a new connection authenticates again
)


def _subnets_of(name: str) -> tuple[IPv4Network, IPv6Network | None]:
    """The subnets a key under subnets/ stands for; RecordError unless the key is in the
    reference's canonical form (any other spelling would name the same subnet as the real
    lease's key, so a put or a delete on it could stand in for it)."""
    parsed = parse_key(name)
    if parsed is None:
        raise RecordError(
            f"key {name!r} is not a subnet key in canonical form like 10.244.3.0-24", "key"
        )
    return parsed


def _lease_from_kv(prefix: bytes, kv: Any) -> Lease:
    """Build a Lease from an etcd key/value; RecordError (with its rule) if the key or the
    value is not one to use. Any failure to decode is that record's alone."""
    subnet, subnet6 = _subnets_of(kv.key[len(prefix) :].decode(errors="replace"))
    try:
        attrs = LeaseAttrs.decode(kv.value)
    except RecordError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a hostile record triggers
        raise RecordError(f"cannot be decoded ({type(e).__name__}: {e})") from None
    return Lease(subnet, attrs, kv.lease, kv.mod_revision, kv.create_revision, subnet6)


def _rejected(e: RecordError) -> Rejected:
    return Rejected(e.rule, str(e))


def _cancelled_here() -> bool:
    """Whether a CancelledError is this task's own cancellation, rather than a gRPC call
    cancelled under it (its channel closed), which is a connection failure like any other."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class EtcdRegistry:
    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = "/coreos.com/network",
        tls: TLSFiles | None = None,
        username: str = "",
        password: str = "",
    ) -> None:
        if not endpoints:
            raise EtcdConfigError(
                "--etcd-endpoints is empty; give at least one http(s)://host:port"
            )
        self.endpoints = [Endpoint.parse(e.strip()) for e in endpoints if e.strip()]
        tls = tls or TLSFiles()
        if bool(tls.certfile) != bool(tls.keyfile):
            raise EtcdConfigError(
                "--etcd-certfile and --etcd-keyfile must be given together; set both or neither"
            )
        if bool(username) != bool(password):
            raise EtcdConfigError(
                "--etcd-username and --etcd-password must be given together; set both or neither"
            )
        use_tls = any(e.secure for e in self.endpoints) or bool(tls.certfile or tls.cafile)
        self._credentials = tls.credentials() if use_tls else None
        self._auth = (username or None, password or None)
        self.prefix = prefix.rstrip("/")
        self.subnets_prefix = f"{self.prefix}/subnets/".encode()
        self.config_key = f"{self.prefix}/config".encode()
        self._current = 0
        self._client: _Client | None = None
        self._closing: dict[asyncio.Task[None], _Client] = {}  # dropped, closed after a while
        self.errors = 0  # failed requests, for metrics
        self.last_error = ""  # of the last request; "" when it succeeded

    # -- connection and fail-over ---------------------------------------------------------
    def _new_client(self) -> _Client:
        ep = self.endpoints[self._current]
        return _Client(
            host=ep.host,
            port=ep.port,
            username=self._auth[0],
            password=self._auth[1],
            timeout=RPC_TIMEOUT,
            options=_CHANNEL_OPTIONS,
            credentials=self._credentials,
        )

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self._current]

    async def fail_over(self, client: _Client | None = None) -> None:
        """Drop a failed connection (`client`; by default the current one) and move to the next
        endpoint (the same one if alone).

        Several tasks share the connection, so a failure one of them saw on a connection
        another has already replaced changes nothing: it must not throw away the connection
        just made. The dropped connection is closed only after RPC_TIMEOUT, when the calls
        still in flight on it have ended with their own answer or error; closing a gRPC channel
        under them would raise CancelledError into those tasks, which then look cancelled and
        end quietly (a peer watch or a lease renewal stopped for good).
        """
        client = client or self._client
        if client is None or client is not self._client:
            return
        self._client = None
        self._current = (self._current + 1) % len(self.endpoints)
        task = asyncio.get_running_loop().create_task(self._close_later(client))
        self._closing[task] = client
        task.add_done_callback(self._closing.pop)

    async def _close_later(self, client: _Client) -> None:
        await asyncio.sleep(RPC_TIMEOUT + 1)
        with contextlib.suppress(Exception):  # a dead channel may fail to close: gone anyway
            await asyncio.wait_for(client.close(), 1)

    async def call(self, op: Callable[[aetcd.Client], Any]) -> Any:
        """Run `op(client)`, moving to the next endpoint on a connection error.

        Each endpoint is tried once; if none answers, EtcdUnavailable is raised.
        """
        last: BaseException | None = None
        for _ in range(len(self.endpoints)):
            if self._client is None:
                self._client = self._new_client()
            client = self._client
            try:
                try:
                    result = await op(client)
                except asyncio.CancelledError:
                    if _cancelled_here():
                        raise
                    raise etcd_exc.ConnectionFailedError("the call was cancelled") from None
                self.last_error = ""
                return result
            except (TimeoutError, etcd_exc.ClientError) as e:
                self.errors += 1
                self.last_error = str(e) or type(e).__name__
                self._refused(e)
                if not isinstance(e, (*_TRANSIENT, TimeoutError)):
                    raise
                last = e
                if len(self.endpoints) > 1:
                    log.warning(
                        "etcd endpoint %s failed (%s); trying the next one", self.endpoint, e
                    )
                await self.fail_over(client)
        raise EtcdUnavailable(
            f"no etcd endpoint answered ({', '.join(map(str, self.endpoints))}): {last}"
        )

    def _refused(self, e: Exception) -> None:
        """Raise EtcdConfigError for errors only the operator can fix: credentials, permissions."""
        text = str(e)
        if "authentication failed" in text or "user name is empty" in text:
            raise EtcdConfigError(
                f"etcd at {self.endpoint} refused user {self._auth[0]!r} ({text}); "
                "check --etcd-username/--etcd-password"
            ) from None
        if "permission denied" in text:
            raise EtcdConfigError(
                f"etcd at {self.endpoint} denied user {self._auth[0]!r} access ({text}); "
                f"grant it readwrite on the prefix {self.prefix}/"
            ) from None

    async def close(self) -> None:
        clients = [*self._closing.values(), *([self._client] if self._client else [])]
        for task in list(self._closing):
            task.cancel()
        self._client = None
        for client in clients:
            with contextlib.suppress(Exception):  # closing on shutdown: nothing to recover
                await asyncio.wait_for(client.close(), 1)

    # -- config -----------------------------------------------------------------------------
    async def get_config(self) -> bytes | None:
        got = await self.call(lambda c: c.get(self.config_key))
        return None if got is None else got.value

    async def put_config(self, raw: bytes) -> None:
        await self.call(lambda c: c.put(self.config_key, raw))

    # -- leases -----------------------------------------------------------------------------
    def key(self, subnet: IPv4Network, subnet6: IPv6Network | None = None) -> bytes:
        return self.subnets_prefix + subnet_key(subnet, subnet6).encode()

    async def snapshot(self) -> Snapshot:
        rng = await self.call(lambda c: c.get_prefix(self.subnets_prefix))
        leases: dict[str, Lease] = {}
        bad: dict[str, Rejected] = {}
        for kv in rng:
            name = kv.key[len(self.subnets_prefix) :].decode(errors="replace")
            try:
                leases[name] = _lease_from_kv(self.subnets_prefix, kv)
            except RecordError as e:
                bad[name] = _rejected(e)
        return Snapshot(leases, bad, rng.header.revision, rng.header.cluster_id)

    async def get_lease(self, subnet: IPv4Network) -> Lease | None:
        """The lease of an IPv4 subnet, whether its key has an IPv6 part or not."""
        got = await self.call(lambda c: c.get_prefix(self.key(subnet)))
        for kv in got:
            try:
                lease = _lease_from_kv(self.subnets_prefix, kv)
            except RecordError:
                continue
            if lease.subnet == subnet:
                return lease
        return None

    async def create_lease(
        self,
        subnet: IPv4Network,
        attrs: LeaseAttrs,
        ttl: int,
        subnet6: IPv6Network | None = None,
    ) -> Lease | None:
        """Claim a free subnet: put the key with a new etcd lease only if the key is absent.

        Returns None when someone else holds the key (a lost race); the granted etcd lease is
        revoked then, so nothing leaks.
        """
        key, value = self.key(subnet, subnet6), attrs.encode()

        async def op(c: aetcd.Client) -> Lease | None:
            grant = await c.lease(ttl)
            ok, resp = await c.transaction(
                compare=[c.transactions.version(key) == 0],
                success=[c.transactions.put(key, value, lease=grant)],
                failure=[],
            )
            if not ok:
                await c.revoke_lease(grant.id)
                return None
            rev = resp[0].response_put.header.revision
            return Lease(subnet, attrs, grant.id, rev, rev, subnet6)

        return await self.call(op)

    async def update_lease(self, lease: Lease, attrs: LeaseAttrs) -> Lease:
        """Rewrite a held lease's record, keeping its etcd lease (or reservation) as it is."""
        key, value = self.subnets_prefix + lease.key.encode(), attrs.encode()

        async def op(c: aetcd.Client) -> Lease:
            kw = {"lease": lease.etcd_lease} if lease.etcd_lease else {}
            resp = await c.put(key, value, **kw)
            return replace(lease, attrs=attrs, mod_revision=resp.header.revision)

        return await self.call(op)

    async def keepalive(self, etcd_lease: int) -> int:
        """Refresh an etcd lease; returns its new TTL in seconds (<= 0: the lease is gone)."""
        reply = await self.call(lambda c: c.refresh_lease(etcd_lease))
        return 0 if reply is None else int(reply.TTL)

    async def time_to_live(self, etcd_lease: int) -> int:
        info = await self.call(lambda c: c.get_lease_info(etcd_lease, keys=False))
        return int(info.TTL)

    async def revoke(self, etcd_lease: int) -> None:
        """Release an etcd lease at once (its key, if still attached, goes with it)."""
        await self.call(lambda c: c.revoke_lease(etcd_lease))

    async def reserve(
        self, subnet: IPv4Network, attrs: LeaseAttrs, subnet6: IPv6Network | None = None
    ) -> None:
        """Write a reservation: the record with no etcd lease, so it never expires."""
        await self.call(lambda c: c.put(self.key(subnet, subnet6), attrs.encode()))

    async def delete_lease(self, lease: Lease | IPv4Network) -> bool:
        """Delete a lease's key (an IPv4 subnet alone names its key without an IPv6 part)."""
        key = lease.key if isinstance(lease, Lease) else subnet_key(lease)
        return bool(await self.call(lambda c: c.delete(self.subnets_prefix + key.encode())))

    # -- watch ------------------------------------------------------------------------------
    async def watch(self, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Events under `<prefix>/subnets/` from `start_revision` on.

        Raises `aetcd.exceptions.RevisionCompactedError` when that revision is compacted, and
        a connection error (or EtcdUnavailable) when the stream breaks, after dropping the
        stream's connection: the caller re-lists. Ends without error when the connection is
        closed under it (another caller dropped it): the caller watches again.
        """
        used: list[_Client] = []

        def start(c: _Client) -> Any:
            used.append(c)
            return c.watch_prefix(self.subnets_prefix, start_revision=start_revision)

        w = await self.call(start)
        try:
            async for ev in self._events(w, used[-1]):
                kv = ev.kv
                key = kv.key[len(self.subnets_prefix) :].decode(errors="replace")
                try:
                    if ev.kind == "DELETE":
                        subnet, lease = ident_of(*_subnets_of(key)), None
                    else:  # the lease's own subnet: one object per peer, not two
                        lease = _lease_from_kv(self.subnets_prefix, kv)
                        subnet = lease.ident
                except RecordError as e:  # a delete of such a key was never in the table
                    error = None if ev.kind == "DELETE" else _rejected(e)
                    yield WatchEvent(key, None, None, error, kv.mod_revision)
                    continue
                yield WatchEvent(key, subnet, lease, revision=kv.mod_revision)
        finally:
            with contextlib.suppress(Exception):  # the stream may already be gone
                await asyncio.wait_for(w.cancel(), 1)

    async def _events(self, w: Any, client: _Client) -> AsyncIterator[Any]:
        """The watch's events; a broken stream drops its connection (`fail_over`) and raises
        a connection error, also when it shows as a stray CancelledError."""
        try:
            async for ev in w:
                yield ev
        except etcd_exc.RevisionCompactedError:
            raise
        except asyncio.CancelledError:
            if _cancelled_here():
                raise
            await self.fail_over(client)
            raise etcd_exc.ConnectionFailedError("the watch stream was cancelled") from None
        except Exception:
            await self.fail_over(client)
            raise
