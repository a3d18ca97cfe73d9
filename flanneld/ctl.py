"""`flannelctl`: operator commands beside the agent. `cleanup` removes everything the agent owns
on this node (its routes, its devices with their ARP/FDB entries, its iptables chains or nft
table) and nothing else; running it twice is harmless.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import socket
import sys

from pyroute2 import AsyncIPRoute, NetlinkError

from backends.netlink import MAIN_TABLE, ROUTE_PROTOCOL

from .masq import Masquerade

# The agent's devices: vxlan's flannel.<VNI> and udp's TUN flannel<N>, and only of those kinds.
_OWNED_LINKS = {"vxlan": re.compile(r"flannel\.\d+"), "tun": re.compile(r"flannel\d+")}


async def cleanup_kernel(ipr: AsyncIPRoute) -> list[str]:
    """Delete the agent's routes (route protocol 155) and devices; what was removed, as text."""
    done: list[str] = []
    routes = [r async for r in await ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE)]
    for r in routes:
        if r["proto"] != ROUTE_PROTOCOL:
            continue
        dst = f"{r.get('dst') or '0.0.0.0'}/{r['dst_len']}"
        try:
            await ipr.route(
                "del",
                dst=dst,
                table=MAIN_TABLE,
                proto=ROUTE_PROTOCOL,
                oif=r.get("oif"),
                gateway=r.get("gateway"),
            )
            done.append(f"route {dst}")
        except NetlinkError:
            pass  # gone meanwhile, or went with a device
    async for link in await ipr.link("dump"):
        name = link.get("ifname") or ""
        kind = link.get(("linkinfo", "kind")) or ""
        pattern = _OWNED_LINKS.get(kind)
        if pattern is not None and pattern.fullmatch(name):
            try:
                await ipr.link("del", index=link["index"])
                done.append(f"device {name} ({kind})")
            except NetlinkError:
                pass
    return done


async def _cleanup(args: argparse.Namespace) -> int:
    async with AsyncIPRoute() as ipr:
        removed = await cleanup_kernel(ipr)
    for item in removed:
        print(f"removed {item}")
    if not removed:
        print("no route or device of the agent's left on this node")
    if shutil.which("iptables") or shutil.which("nft"):
        if not await Masquerade.cleanup():
            print("could not remove every masquerade/forward rule (see the error above)")
            return 1
        print("no masquerade/forward rule of the agent's left on this node")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flannelctl", description="operator commands for flanneld")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("cleanup", help="remove the agent's routes and devices from this node")
    args = p.parse_args(argv)
    return asyncio.run({"cleanup": _cleanup}[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
