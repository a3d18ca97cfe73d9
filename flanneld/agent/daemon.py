"""Wiring: config → interface → backend → lease → peer watch → reconcile loop.

One asyncio loop runs it all. SIGTERM/SIGINT stop it within 2 s and leave the kernel state
and the etcd lease in place, so a restarted agent drops no packet (vxlan, host-gw).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable
from dataclasses import astuple
from pathlib import Path

from pyroute2.iproute.linux import AsyncIPRoute

import backends
from backends.base import Backend, BackendContext
from flanneld.agent import status
from flanneld.agent.leasemgr import LEASE_TTL, LeaseManager
from flanneld.agent.watcher import PeerWatcher
from flanneld.core.admission import PeerRules
from flanneld.core.config import ConfigError, NetworkConfig, underlay_problem
from flanneld.core.errors import FlannelError, StateError
from flanneld.core.interfaces import ExternalInterface, InterfaceError, select
from flanneld.core.lease import Lease
from flanneld.core.options import SAVED_CONFIG, Options
from flanneld.core.peers import Change
from flanneld.core.schedule import full_pass_period
from flanneld.core.stats import AgentStats
from flanneld.core.subnets import Network
from flanneld.edges import heap, sdnotify, subnetenv
from flanneld.edges.masq import Masquerade
from flanneld.edges.netif import discover
from flanneld.edges.registry import EtcdConfigError, EtcdRegistry

log = logging.getLogger(__name__)
# a pass that changed this many kernel entries, or a full pass, ends with heap.trim(): under a
# millisecond at 10,000 peers, and 3-6 MB less RSS after a burst of them
TRIM_AFTER = 100

CONFIG_POLL = 1.0
COALESCE = 0.05  # gather a burst of watch events into one reconcile...
COALESCE_MAX = 0.5  # ...while they keep coming, up to this long
PEER_LOG_LIMIT = 50  # peer changes of one batch logged one by one at INFO; the rest at DEBUG


def _counts(by_kind: dict[str, int]) -> str:
    return ",".join(f"{n} {kind}" for kind, n in sorted(by_kind.items())) or "0"


class FatalError(StateError):
    """Startup cannot go on (bad interface, backend refuses the host)."""


async def essential(what: str, loop: Awaitable[None]) -> None:
    """Run one of the agent's loops, which end only when the agent stops. Ending any other
    way (a bug; a cancellation that was not the agent's) raises FatalError, so the agent exits
    and its supervisor restarts it, rather than running on without, say, its peer watch: a
    task of a TaskGroup that ends cancelled does so silently."""
    try:
        await loop
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise FatalError(f"the {what} stopped: cancelled from inside (a bug); exiting") from None
    raise FatalError(f"the {what} stopped (a bug); exiting")


class Agent:
    def __init__(self, opts: Options, registry: EtcdRegistry) -> None:
        self.opts = opts
        self.registry = registry
        self.ready = False
        self.config: NetworkConfig | None = None
        self.config_raw: bytes | None = None  # the config running, as read
        self.config_source = ""  # "etcd", or "saved": the last good one, etcd's was not
        self.config_problem = ""  # why etcd's config is not the one running ("": it is)
        self.ext: ExternalInterface | None = None
        self.backend: Backend | None = None
        self.leases: LeaseManager | None = None
        self.watcher: PeerWatcher | None = None
        self.masq: Masquerade | None = None
        # counters and facts for /status and /metrics
        self.reconcile_runs: dict[str, int] = {}
        self.entry_counts: dict[tuple[str, str], int] = {}
        self.last_reconcile_seconds = 0.0
        self.peer_changed: dict[Network, float] = {}  # Unix time of each peer's last change
        self._trigger = asyncio.Event()
        self._peer_events = 0  # watch batches with changes, for _quiet()
        self._lease_changed = False
        self._status_sent = ""  # the last STATUS= line of notify_status

    # -- startup ----------------------------------------------------------------------------
    def validate(self, raw: bytes, ext: ExternalInterface) -> NetworkConfig:
        """The whole config as this node would run it, checked before anything is touched:
        the JSON, the backend's options, the Network against this node's underlay."""
        config = backends.checked_config(raw)
        if config.network is not None:
            if ext.ext_addr.is_unspecified:
                raise ConfigError(
                    f"network config: the network has IPv4, but {ext.name} has no IPv4 "
                    'address; give it one, pass --public-ip, or set "EnableIPv4": false for '
                    "an IPv6-only network"
                )
            addrs = (ext.iface_addr, ext.ext_addr)
            if why := underlay_problem(config.network, ext.underlay, addrs):
                raise ConfigError(why)
        if config.ipv6 is not None:
            if ext.ext_addr6 is None:
                raise ConfigError(
                    f"network config: EnableIPv6 is true, but {ext.name} has no global IPv6 "
                    "address; give it one, or pass --public-ipv6"
                )
            addrs6 = [a for a in (ext.iface_addr6, ext.ext_addr6) if a is not None]
            if why := underlay_problem(config.ipv6.network, ext.underlay6, addrs6, "IPv6Network"):
                raise ConfigError(why)
        return config

    @property
    def saved_config(self) -> Path:
        return Path(self.opts.state_dir) / SAVED_CONFIG

    def _last_good(self, ext: ExternalInterface) -> NetworkConfig | None:
        """The config this node last ran with, if it is still valid here."""
        try:
            raw = self.saved_config.read_bytes()
            config = self.validate(raw, ext)
        except (OSError, ConfigError):
            return None
        self.config_raw, self.config_source = raw, "saved"
        return config

    async def wait_for_config(self, ext: ExternalInterface) -> NetworkConfig:
        """Poll `<prefix>/config` until it is valid (like the reference). A missing or invalid
        one is logged once; if this node ran with a valid config before (saved in the state
        directory), the agent runs with that one instead of waiting, and says so."""
        last = ""
        while True:
            try:
                raw = await self.registry.get_config()
                if raw is None:
                    raise ConfigError(
                        f"network config not found at {self.registry.config_key.decode()}; "
                        "create it, e.g. etcdctl put <prefix>/config "
                        '\'{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}\''
                    )
                config = self.validate(raw, ext)
            except (ConfigError, EtcdConfigError) as e:
                if (config := self._last_good(ext)) is not None:
                    log.error(
                        "%s; running with the last good config, saved in %s",
                        e,
                        self.saved_config,
                    )
                    self.config_problem = str(e)
                    return config
                msg = str(e)
            except Exception as e:  # noqa: BLE001 - etcd unreachable: keep waiting
                msg = f"cannot read the network config from etcd: {e}"
            else:
                self.config_raw, self.config_source = raw, "etcd"
                self._save_config(raw)
                return config
            if msg != last:
                log.error("%s (waiting for a valid config)", msg)
                last = msg
            await asyncio.sleep(CONFIG_POLL)

    def _save_config(self, raw: bytes) -> None:
        try:
            subnetenv.write(str(self.saved_config), raw.decode(errors="replace"))
        except OSError as e:
            log.warning("cannot save the network config in %s (%s)", self.saved_config, e)

    async def watch_config(self) -> None:
        """Say when the config in etcd stops being the one running: changed (a restart
        applies it), invalid or missing (the agent goes on with the one it runs)."""
        assert self.ext is not None
        while True:
            await asyncio.sleep(self.opts.reconcile_interval)
            try:
                raw = await self.registry.get_config()
            except Exception:  # noqa: BLE001 - etcd trouble is the watcher's to report
                continue
            if raw == self.config_raw:
                problem = ""
            elif raw is None:
                problem = "the network config was deleted from etcd"
            else:
                try:
                    self.validate(raw, self.ext)
                    problem = "the network config in etcd changed; restart flanneld to apply it"
                except ConfigError as e:
                    problem = str(e)
            if problem != self.config_problem:
                if problem:
                    log.error("%s; running with the config it started with", problem)
                else:
                    log.info("the network config in etcd is the running one again")
                self.config_problem = problem

    async def pick_interface(self) -> ExternalInterface:
        async with AsyncIPRoute() as ipr:
            links, default_oif = await discover(ipr)
        ext = select(
            links,
            self.opts.iface,
            self.opts.iface_regex,
            default_oif,
            self.opts.public_ip,
            self.opts.public_ipv6,
        )
        log.info(
            "using interface %s (%s), public IP %s, MTU %d",
            ext.name,
            ext.iface_addr,
            ext.ext_addr,
            ext.mtu,
        )
        return ext

    async def _quiet(self) -> None:
        """Wait until no peer change came for COALESCE s, at most COALESCE_MAX: a burst of
        thousands of leases becomes a few passes, each planning every peer, instead of one
        per watch batch (which kept the loop from reading the watch); one lone change waits
        COALESCE."""
        waited = 0.0
        while True:
            seen = self._peer_events
            await asyncio.sleep(COALESCE)
            waited += COALESCE
            if self._peer_events == seen or waited >= COALESCE_MAX:
                return

    def _on_peers(self, changes: list[Change]) -> None:
        own = self.leases.lease.ident if self.leases and self.leases.lease else None
        now = time.time()
        for i, ch in enumerate(changes):
            if ch.kind == "removed":
                self.peer_changed.pop(ch.subnet, None)
            else:
                self.peer_changed[ch.subnet] = now
            if ch.subnet != own:
                level = logging.INFO if i < PEER_LOG_LIMIT else logging.DEBUG
                ip = ch.lease.attrs.node_ip
                log.log(level, "peer %s %s (public IP %s)", ch.subnet, ch.kind, ip)
        if len(changes) > PEER_LOG_LIMIT:  # a listing of 10,000 leases: not one line each
            more = len(changes) - PEER_LOG_LIMIT
            log.info("... and %d more peer changes (logged at debug level)", more)
        self._peer_events += 1
        if self.leases is not None:
            self.leases.notice(changes)
        self._trigger.set()  # the pass it triggers updates STATUS: once per pass, not per batch

    def _on_lease(self, lease: Lease) -> None:
        self._lease_changed = True
        self._trigger.set()
        self.notify_status()

    def notify_status(self) -> None:
        """One STATUS= line for systemd: the lease, the backend and how many peers."""
        lease = self.leases.lease if self.leases else None
        if lease is None or self.backend is None:
            return
        table = self.watcher.table.leases if self.watcher else {}
        n = len(table) - (lease.ident in table)  # O(1): this runs after every pass
        line = f"STATUS=lease {lease.ident}, backend {self.backend.type_name}, {n} peers"
        if line != self._status_sent:  # only news: not one datagram per pass
            self._status_sent = line
            sdnotify.notify(line)

    async def start(self) -> None:
        opts = self.opts
        try:
            self.ext = ext = await self.pick_interface()
        except InterfaceError as e:
            raise FatalError(str(e)) from None
        self.config = config = await self.wait_for_config(ext)
        for net, length, lo, hi in (
            (config.network, config.subnet_len, config.subnet_min, config.subnet_max),
            astuple(config.ipv6) if config.ipv6 else (None, 0, None, None),
        ):
            if net is not None:
                log.info("network %s, subnets /%d in %s..%s", net, length, lo, hi)
        log.info("backend %s", config.backend_type)
        ctx = BackendContext(ext, config, Path(opts.state_dir), config.backend)
        try:
            self.backend = backends.get_backend(config.backend_type)(ctx)
            attrs = await self.backend.prepare()
        except FlannelError as e:
            raise FatalError(str(e)) from None
        self.leases = LeaseManager(
            self.registry,
            attrs,
            config,
            previous=subnetenv.previous_subnet(opts.subnet_file),
            ttl=LEASE_TTL,
            renew_margin=opts.subnet_lease_renew_margin * 60,
            on_lease=self._on_lease,
            previous6=subnetenv.previous_subnet(opts.subnet_file, "FLANNEL_IPV6_SUBNET", 6)
            if config.ipv6
            else None,
        )
        lease = await self.leases.take()
        self._lease_changed = False
        await self.backend.configure(lease)
        await self.start_rules(config, lease)
        self.watcher = PeerWatcher(
            self.registry,
            self._on_peers,
            self.leases.renew_now,
            check=PeerRules(config, ext.ext_addr, ext.ext_addr6).check,
            on_data_loss=self.leases.etcd_lost_data,
            grace=opts.subnet_lease_renew_margin * 60,
        )

    async def start_rules(self, config: NetworkConfig, lease: Lease) -> None:
        """flannel's masquerade (--ip-masq) and FORWARD accept rules, kept by a resync loop."""
        opts = self.opts
        if not (opts.ip_masq or opts.iptables_forward_rules):
            return
        if not opts.ip_masq and not (shutil.which("iptables") or shutil.which("nft")):
            log.info("neither iptables nor nft on this host: no FORWARD accept rules installed")
            return
        self.masq = Masquerade(
            config.network,
            lease.subnet,
            masq=opts.ip_masq,
            forward=opts.iptables_forward_rules,
            random_fully=not opts.ip_masq_fully_random_disable,
            mode="nftables" if config.enable_nftables else None,
            network6=config.ipv6.network if config.ipv6 else None,
            subnet6=lease.ipv6_subnet if config.ipv6 else None,
        )
        await self.masq.ensure()

    async def run(self) -> None:
        await self.start()
        assert self.watcher and self.leases and self.backend
        async with asyncio.TaskGroup() as tg:
            tg.create_task(essential("peer watch", self.watcher.run()))
            await self.watcher.synced.wait()  # never reconcile against an empty, unsynced table
            await self.reconcile()
            self.write_subnet_env()
            tg.create_task(essential("lease renewal", self.leases.maintain()))
            tg.create_task(essential("reconcile loop", self.reconcile_loop()))
            tg.create_task(essential("config watch", self.watch_config()))
            if self.masq is not None:
                tg.create_task(
                    essential("firewall resync", self.masq.run(self.opts.iptables_resync))
                )

    # -- steady state -----------------------------------------------------------------------
    def peers(self, own: Network) -> dict[Network, Lease]:
        """The peer table without this node's own lease (`own`: its `Lease.ident`)."""
        assert self.watcher
        peers = dict(self.watcher.table.leases)  # a copy without rehashing 10,000 subnets
        peers.pop(own, None)
        return peers

    async def reconcile(self, full: bool = True) -> None:
        """One pass; `full` compares against a fresh kernel dump (periodic passes, lease
        changes), otherwise against what the backend applied (passes after peer events)."""
        assert self.backend and self.leases and self.leases.lease
        lease = self.leases.lease
        peers = self.peers(lease.ident)
        t0 = time.perf_counter()
        try:
            if self._lease_changed:
                full = True
                log.warning("this node's subnet is now %s; reconfiguring", lease.key)
                await self.backend.configure(lease)
                if self.masq is not None:
                    self.masq.subnet, self.masq.subnet6 = lease.subnet, lease.ipv6_subnet
                    await self.masq.ensure()
                self.write_subnet_env()
                self._lease_changed = False  # only once all of it is done: else retried
            result = await self.backend.reconcile(lease, peers, full)
        except Exception:  # a kernel hiccup must not end the agent; the next period retries
            log.exception("reconcile failed; retrying in %.0f s", self.opts.reconcile_interval)
            return
        self.last_reconcile_seconds = time.perf_counter() - t0
        changed = sum(result.added.values()) + sum(result.removed.values())
        if full or changed >= TRIM_AFTER:  # after a burst: its garbage back to the kernel
            heap.trim()
        self.notify_status()
        ms = self.last_reconcile_seconds * 1000
        mode = "full" if full else "event"
        self.reconcile_runs[mode] = self.reconcile_runs.get(mode, 0) + 1
        for op in ("added", "removed", "repaired", "failed"):
            for kind, n in getattr(result, op).items():
                self.entry_counts[op, kind] = self.entry_counts.get((op, kind), 0) + n
        level = logging.INFO if result.changed or result.failed else logging.DEBUG
        log.log(
            level,
            "reconcile%s: %d peers, added %s, removed %s, failed %s in %.0f ms",
            "" if full else " (event)",
            len(peers),
            _counts(result.added),
            _counts(result.removed),
            _counts(result.failed),
            ms,
        )

    async def reconcile_loop(self) -> None:
        """Event passes as peers change; a full pass every --reconcile-interval (or less
        often at scale: `full_pass_period`, with a cheap `Backend.intact` check every
        interval in between that brings the full pass forward)."""
        loop = asyncio.get_running_loop()
        interval = self.opts.reconcile_interval
        next_full = next_check = loop.time() + interval
        while True:
            wake = min(next_full, next_check)
            try:
                await asyncio.wait_for(self._trigger.wait(), max(0.0, wake - loop.time()))
                await self._quiet()
            except TimeoutError:
                pass
            now = loop.time()
            full = now >= next_full
            if not full and not self._trigger.is_set():  # an interval between full passes
                next_check = now + interval
                if self._lease_changed or not await self._intact():  # (a retry, for the first)
                    full = True
                else:
                    continue
            self._trigger.clear()
            await self.reconcile(full)
            if full:
                next_check = loop.time() + interval
                next_full = loop.time() + full_pass_period(interval, self.last_reconcile_seconds)

    async def _intact(self) -> bool:
        assert self.backend
        try:
            if await self.backend.intact():
                return True
        except Exception:  # a check that fails is no reason to skip the repair
            log.exception("backend check failed")
        log.warning("%s backend state is gone; reconciling at once", self.backend.type_name)
        return False

    def stats(self) -> AgentStats:
        """The snapshot the metrics render."""
        return status.stats_of(self)

    async def status(self) -> dict:
        """What `flannelctl status` shows: lease, backend, peers and their datapath health."""
        return await status.status_of(self)

    def write_subnet_env(self) -> None:
        assert self.config and self.backend and self.leases and self.leases.lease
        lease = self.leases.lease
        v6 = self.config.ipv6
        text = subnetenv.render(
            self.config.network,
            lease.subnet,
            self.backend.mtu,
            self.opts.ip_masq,
            v6.network if v6 else None,
            lease.ipv6_subnet,
        )
        try:
            subnetenv.write(self.opts.subnet_file, text)
        except OSError as e:
            log.error("cannot write %s (%s); fix --subnet-file", self.opts.subnet_file, e)
            return
        if not self.ready:
            self.ready = True
            log.info(
                "ready: wrote %s (subnet %s, MTU %d)",
                self.opts.subnet_file,
                lease.ident,
                self.backend.mtu,
            )
            sdnotify.notify(
                "READY=1", f"STATUS=subnet {lease.ident}, backend {self.backend.type_name}"
            )
            self._status_sent = ""  # that replaced it: the next pass says the peers again
