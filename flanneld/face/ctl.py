"""`flannelctl`: operator commands beside the agent.

`status` asks the running agent (its unix socket in the state directory) for its lease, peers
and datapath health; `leases`, `config` and `reserve`/`unreserve` work on etcd directly with the
agent's own flags and validation; `cleanup` removes everything the agent owns on this node (its
routes, its devices with their ARP/FDB entries, its iptables and ip6tables chains or nft
tables) and nothing else, and is harmless twice; `rules` installs, checks, repairs or removes
the masquerade and forward rules alone, as the agent would for a network and subnet (and an
IPv6 network and subnet on a dual-stack node).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

import backends
from backends import netlink
from backends.base import ReconcileResult
from backends.reconcile import diff
from backends.rtnl import Rtnl, delete_nexthop
from flanneld.core.admission import PeerRules
from flanneld.core.config import ConfigError, parse_config
from flanneld.core.errors import FlannelError, StateError
from flanneld.core.lease import Lease
from flanneld.core.options import ENV_PREFIX, SOCKET_NAME, Options
from flanneld.core.peers import PeerTable
from flanneld.core.reservation import in_the_way, plan_reservation
from flanneld.core.text import table_lines
from flanneld.edges.masq import IPTABLES, NFTABLES, Masquerade
from flanneld.edges.registry import EtcdRegistry, TLSFiles


def _owned_links() -> list[tuple[str, re.Pattern[str]]]:
    """Every backend's devices: (link kind, name pattern)."""
    return [
        (kind, re.compile(name))
        for backend in backends.known_backends()
        for kind, name in backends.get_backend(backend).owned_devices()
    ]


class CtlError(StateError):
    """A command cannot do what was asked; the message says why and the fix (exit 2)."""


# -- cleanup ---------------------------------------------------------------------------------
async def cleanup_kernel(netns: str | None = None) -> list[str]:
    """Delete the agent's routes (route protocol 155, IPv4 and IPv6) and devices, in this
    namespace or the named one (tests); what was removed, as text."""
    rtnl = Rtnl(netns)
    try:
        routes = await rtnl.dump_routes() | await rtnl.dump_routes(version=6)
        applied = await netlink.apply(rtnl, diff(set(), routes), ReconcileResult())
        stray = await rtnl.dump_nexthops()  # those no route of ours went through
        await rtnl.run([delete_nexthop(nhid) for nhid in stray])
    finally:
        rtnl.close()
    done = [f"route {r.dst}" for r in applied.removed]  # (a route gone meanwhile: not listed)
    owned = _owned_links()
    async with netlink.open_ipr(netns) as ipr:
        async for link in await ipr.link("dump"):
            name = link.get("ifname") or ""
            kind = link.get(("linkinfo", "kind")) or ""
            if any(k == kind and pattern.fullmatch(name) for k, pattern in owned):
                try:
                    await ipr.link("del", index=link["index"])
                    done.append(f"device {name} ({kind})")
                except NetlinkError:
                    pass
    return done + await backends.cleanup_all(netns)  # what else backends leave: udp's tc filter


async def _cleanup(args: argparse.Namespace) -> int:
    removed = await cleanup_kernel()
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print("no route or device of the agent's left on this node")
    if any(shutil.which(tool) for tool in ("iptables", "ip6tables", "nft")):
        if not await Masquerade.cleanup():
            print("could not remove every masquerade/forward rule (see the error above)")
            return 1
        print("no masquerade/forward rule of the agent's left on this node")
    return 0


# -- rules -----------------------------------------------------------------------------------
async def _rules(args: argparse.Namespace) -> int:
    if args.action != "cleanup" and (args.network is None or args.subnet is None):
        raise CtlError(
            f"rules {args.action} needs --network and --subnet (FLANNEL_NETWORK and the "
            "network of FLANNEL_SUBNET in subnet.env)"
        )
    if args.action != "cleanup" and (args.network6 is None) != (args.subnet6 is None):
        raise CtlError(
            f"rules {args.action} needs --network6 and --subnet6 together for the IPv6 rules "
            "(FLANNEL_IPV6_NETWORK and the network of FLANNEL_IPV6_SUBNET), or neither"
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.action == "cleanup":
        return 0 if await Masquerade.cleanup() else 1
    masq = Masquerade(
        args.network,
        args.subnet,
        forward=not args.no_forward,
        random_fully=not args.no_random_fully,
        mode=args.mode,
        masq=not args.no_masq,
        network6=args.network6,
        subnet6=args.subnet6,
    )
    if args.action == "check":
        drift = await masq.check()
        if drift is not None:
            print("\n".join(drift) or "in sync")
        return 0 if drift == [] else 1
    return 0 if await (masq.ensure() if args.action == "ensure" else masq.resync()) else 1


# -- status ----------------------------------------------------------------------------------
def ask_agent(state_dir: str, path: str) -> bytes:
    """GET `path` from the running agent on its status socket in `state_dir`; the body of a
    200 answer (CtlError for no agent or any other answer)."""
    sock = Path(state_dir) / SOCKET_NAME
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(sock))
            s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:
        raise CtlError(
            f"cannot reach the agent at {sock} ({e.strerror or e}); is flanneld running with "
            "this --state-dir (env FLANNELD_STATE_DIR)?"
        ) from None
    head, _, body = data.partition(b"\r\n\r\n")
    first = head.split(b"\r\n", 1)[0].decode(errors="replace") or "nothing"
    if first.split(" ")[1:2] != ["200"]:
        raise CtlError(
            f"the agent at {sock} answered {first!r} for {path}: "
            f"{body[:200].decode(errors='replace')!r}; see its log"
        )
    return body


def fetch_status(state_dir: str) -> dict:
    body = ask_agent(state_dir, "/status")
    try:
        return json.loads(body)
    except ValueError:
        raise CtlError(
            f"the agent in {state_dir} answered a /status that is not JSON; see its log"
        ) from None


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return _duration(time.time() - ts) + " ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = int(max(0, seconds))
    h, m = s // 3600, s % 3600 // 60
    return f"{h}h{m:02d}m" if h else (f"{m}m{s % 60:02d}s" if m else f"{s}s")


def render_status(doc: dict) -> str:
    networks = " + ".join(n for n in (doc["network"], doc.get("ipv6_network")) if n) or "-"
    lines = [
        f"flanneld {doc['version']}: {'ready' if doc['ready'] else 'NOT READY'}   "
        f"backend {doc['backend'] or '-'}   MTU {doc['mtu'] or '-'}   network {networks}"
    ]
    lease = doc.get("lease")
    if lease:
        kind = "reservation" if lease["reservation"] else "lease"
        expiry = (
            "never expires"
            if lease["reservation"]
            else f"expires in {_duration(lease['expires_in'])}, "
            f"renewal in {_duration(lease['renew_in'])}"
        )
        v6 = lease.get("ipv6_subnet")
        subnets = " + ".join(n for n in (lease["subnet"], v6) if n)
        public = doc["public_ip"]
        if public == "0.0.0.0" and doc.get("public_ipv6"):  # an IPv6-only network
            public = doc["public_ipv6"]
        lines.append(f"{kind:<9} {subnets} (public IP {public}), {expiry}")
    else:
        lines.append("lease     none yet")
    etcd = doc["etcd"]
    state = "reachable" if etcd["reachable"] else f"UNREACHABLE: {etcd['last_error']}"
    lines.append(f"{'etcd':<9} {etcd['endpoint']} {state}")
    config = doc.get("config") or {}
    if config.get("source") == "saved":
        lines.append("config    the last good one, saved on this node (etcd's is not valid)")
    if config.get("problem"):
        lines.append(f"config    {config['problem']}")
    if doc.get("datapath_error"):
        lines.append(f"datapath  cannot be inspected: {doc['datapath_error']}")
    dual = any(p.get("ipv6_subnet") for p in doc["peers"])
    head = ("PEER SUBNET", "PUBLIC IP", "BACKEND", "LAST CHANGE", "DATAPATH")
    rows = [head[:2] + ("IPV6 SUBNET", "PUBLIC IPV6") + head[2:] if dual else head]
    for p in doc["peers"]:
        health = (
            p["state"] if p["state"] != "drifted" else "DRIFTED: missing " + "; ".join(p["missing"])
        )
        v6 = (p.get("ipv6_subnet") or "-", p.get("public_ipv6") or "-") if dual else ()
        rows.append(
            (p["subnet"] or "-", p["public_ip"], *v6, p["backend_type"] or "-",
             _ago(p["last_change"]),
             health)
        )  # fmt: skip
    lines.append("")
    lines += table_lines(rows, indent="")
    if len(rows) == 1:
        lines.append("(no peers)")
    for r in doc.get("rejected", []):
        lines.append(f"REJECTED  {r['key']} ({r['rule']}): {r['why']}")
    return "\n".join(lines)


async def _status(args: argparse.Namespace) -> int:
    doc = fetch_status(args.state_dir)
    print(json.dumps(doc, indent=2) if args.json else render_status(doc))
    return 0 if doc["ready"] else 1


# -- etcd tools ------------------------------------------------------------------------------
def _registry(args: argparse.Namespace) -> EtcdRegistry:
    return EtcdRegistry(
        args.etcd_endpoints.split(","),
        args.etcd_prefix,
        TLSFiles(args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile),
        args.etcd_username,
        args.etcd_password,
    )


def _read(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise CtlError(f"cannot read {path} ({e.strerror}); fix the path") from None


def validate_config(raw: bytes) -> str:
    """The agent's own validation; returns a one-line summary or raises ConfigError."""
    config = backends.checked_config(raw)
    parts = []
    if config.network is not None:
        parts.append(
            f"network {config.network}, subnets /{config.subnet_len} from {config.subnet_min} "
            f"to {config.subnet_max}"
        )
    if (v6 := config.ipv6) is not None:
        parts.append(
            f"IPv6 network {v6.network}, subnets /{v6.subnet_len} from {v6.subnet_min} "
            f"to {v6.subnet_max}"
        )
    return ", ".join([*parts, f"backend {config.backend_type}"])


async def _config(args: argparse.Namespace) -> int:
    if args.action == "validate":
        print(f"valid: {validate_config(_read(args.file))}")
        return 0
    reg = _registry(args)
    try:
        if args.action == "show":
            raw = await reg.get_config()
            if raw is None:
                raise CtlError(
                    f"no network config at {reg.config_key.decode()}; write one "
                    "with: flannelctl config set FILE"
                )
            print(raw.decode(errors="replace"))
            return 0
        raw = _read(args.file)
        summary = validate_config(raw)
        await reg.put_config(raw)
        print(f"wrote {reg.config_key.decode()}: {summary}")
        return 0
    finally:
        await reg.close()


async def _leases(args: argparse.Namespace) -> int:
    reg = _registry(args)
    try:
        snap = await reg.snapshot()
        raw = await reg.get_config()
        try:
            rules = PeerRules(parse_config(raw)) if raw is not None else None
        except ConfigError:
            rules = None  # `flannelctl config show` says what is wrong with it
        table = PeerTable(rules.check if rules else None, quiet=True)  # the agent's verdicts
        table.reset(snap)
        rows = []
        # IPv4 first, then IPv6-only leases (whose ident is their IPv6 subnet)
        for _, lease in sorted(table.leases.items(), key=lambda kv: (kv[0].version, kv[0])):
            ttl = None if lease.is_reservation else await reg.time_to_live(lease.etcd_lease)
            rows.append(
                {
                    "subnet": str(lease.subnet) if lease.has_ipv4 else None,
                    "ipv6_subnet": str(lease.ipv6_subnet) if lease.ipv6_subnet else None,
                    "public_ip": str(lease.attrs.public_ip),
                    "public_ipv6": str(v6ip) if (v6ip := lease.attrs.public_ipv6) else None,
                    "node_ip": str(lease.attrs.node_ip),
                    "backend_type": lease.attrs.backend_type,
                    "reservation": lease.is_reservation,
                    "expires_in": ttl,
                }
            )
    finally:
        await reg.close()
    rejected = {key: {"rule": r.rule, "why": r.why} for key, r in sorted(table.rejected.items())}
    if args.json:
        print(json.dumps({"leases": rows, "rejected": rejected}, indent=2))
        return 0
    table = [("SUBNET", "IPV6 SUBNET", "PUBLIC IP", "BACKEND", "EXPIRES")]
    table += [
        (
            r["subnet"] or "-",
            r["ipv6_subnet"] or "-",
            r["node_ip"],
            r["backend_type"] or "-",
            "reservation" if r["reservation"] else _duration(r["expires_in"]),
        )
        for r in rows
    ]
    print("\n".join(table_lines(table, indent="")))
    for key, r in rejected.items():
        print(f"REJECTED {key} ({r['rule']}): {r['why']}")
    return 0


async def _find_lease(reg: EtcdRegistry, text: str) -> Lease | None:
    """The lease or reservation of SUBNET: an IPv4 subnet, or an IPv6 one (its IPv6 half)."""
    try:
        net = ip_network(text, strict=True)
    except ValueError:
        net = None
    if net is None:
        raise CtlError(f"{text!r} is not a subnet like 10.244.7.0/24 or fd00:10:244:7::/64")
    if isinstance(net, IPv4Network):
        return await reg.get_lease(net)
    found = [x for x in (await reg.snapshot()).leases.values() if x.ipv6_subnet == net]
    return found[0] if found else None


async def _reserve(args: argparse.Namespace) -> int:
    reg = _registry(args)
    try:
        if args.command == "unreserve":
            lease = await _find_lease(reg, args.subnet)
            if lease is None:
                raise CtlError(f"no lease or reservation for {args.subnet}")
            if not lease.is_reservation and not args.force:
                raise CtlError(
                    f"{lease.ident} is a lease held by {lease.attrs.node_ip}, not a "
                    "reservation; add --force to delete it anyway"
                )
            await reg.delete_lease(lease)
            print(f"removed {'reservation' if lease.is_reservation else 'lease'} {lease.key}")
            return 0
        raw = await reg.get_config()
        config = parse_config(raw) if raw is not None else None
        plan = plan_reservation(
            config,
            args.subnet,
            args.public_ip,
            args.backend_type,
            args.ipv6_subnet,
            args.public_ipv6,
        )
        node = plan.attrs.node_ip
        taken = in_the_way(plan, (await reg.snapshot()).leases.values())
        if taken and not args.force:
            x = taken[0]
            raise CtlError(
                f"{x.key} (held by {x.attrs.node_ip}) overlaps {plan.key}; add --force to "
                "replace it"
            )
        for x in taken:
            if x.key != plan.key:
                await reg.delete_lease(x)
        await reg.reserve(plan.subnet, plan.attrs, plan.subnet6)
        print(f"reserved {plan.key} for {node}")
        return 0
    finally:
        await reg.close()


# -- command line ----------------------------------------------------------------------------
def _etcd_flags(p: argparse.ArgumentParser) -> None:
    defaults = Options()
    for name in (
        "etcd_endpoints",
        "etcd_prefix",
        "etcd_cafile",
        "etcd_certfile",
        "etcd_keyfile",
        "etcd_username",
        "etcd_password",
    ):
        default = os.environ.get(ENV_PREFIX + name.upper()) or getattr(defaults, name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=default,
            help=f"as flanneld's (env {ENV_PREFIX}{name.upper()})",
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flannelctl", description="operator commands for flanneld")
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="this node's lease, peers and datapath health")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--state-dir",
        default=os.environ.get(ENV_PREFIX + "STATE_DIR") or Options().state_dir,
        help="the agent's --state-dir",
    )
    ls = sub.add_parser("leases", help="every lease and reservation in etcd")
    ls.add_argument("--json", action="store_true")
    _etcd_flags(ls)
    cf = sub.add_parser("config", help="show, validate or write the network config")
    cf.add_argument("action", choices=("show", "validate", "set"))
    cf.add_argument("file", nargs="?", default="-", help="JSON file, or - for stdin")
    _etcd_flags(cf)
    rs = sub.add_parser("reserve", help="reserve a subnet for a node (a key with no TTL)")
    rs.add_argument("subnet", help="IPv4 subnet (IPv6 in an IPv6-only network)")
    rs.add_argument("public_ip", help="the node's PublicIP (IPv6 in an IPv6-only network)")
    rs.add_argument("--backend-type", default="", help="BackendType to record (e.g. host-gw)")
    rs.add_argument("--ipv6-subnet", help="dual-stack: the IPv6 half of the reservation")
    rs.add_argument("--public-ipv6", help="dual-stack: the node's PublicIPv6")
    rs.add_argument("--force", action="store_true", help="take a subnet another node holds")
    _etcd_flags(rs)
    ur = sub.add_parser("unreserve", help="remove a reservation")
    ur.add_argument("subnet", help="its IPv4 subnet, or its IPv6 one")
    ur.add_argument("--force", action="store_true", help="delete even a live lease")
    _etcd_flags(ur)
    sub.add_parser("cleanup", help="remove the agent's routes, devices and rules from this node")
    ru = sub.add_parser("rules", help="install, check, repair or remove the masquerade rules")
    ru.add_argument("action", choices=("ensure", "check", "resync", "cleanup"))
    ru.add_argument("--network", type=IPv4Network, help="cluster network (FLANNEL_NETWORK)")
    ru.add_argument("--subnet", type=IPv4Network, help="this node's lease subnet")
    ru.add_argument(
        "--network6", type=IPv6Network, help="IPv6 cluster network (FLANNEL_IPV6_NETWORK)"
    )
    ru.add_argument("--subnet6", type=IPv6Network, help="this node's IPv6 lease subnet")
    ru.add_argument("--mode", choices=(IPTABLES, NFTABLES), help="default: what the host has")
    ru.add_argument("--no-forward", action="store_true", help="no FLANNEL-FWD rules")
    ru.add_argument("--no-masq", action="store_true", help="no FLANNEL-POSTRTG rules")
    ru.add_argument("--no-random-fully", action="store_true", help="never --random-fully")
    return p


_COMMANDS = {
    "status": _status,
    "leases": _leases,
    "config": _config,
    "reserve": _reserve,
    "unreserve": _reserve,
    "cleanup": _cleanup,
    "rules": _rules,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_COMMANDS[args.command](args))
    except FlannelError as e:
        print(f"flannelctl: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
