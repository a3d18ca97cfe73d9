"""The kernel's WireGuard as the backend's device: a `wireguard` link configured over generic
netlink (pyroute2's `AsyncWireGuard`), read back into the same `DeviceState` the userspace
path gets from wireguard-go. The link is kernel state: it outlives the agent, as vxlan's does.
"""

from __future__ import annotations

import base64
import errno
import logging
from collections.abc import Callable
from ipaddress import ip_address, ip_network
from typing import Any

from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import AsyncWireGuard

from .keys import encode_key
from .uapi import NO_KEY, DeviceState, PeerConfig

log = logging.getLogger(__name__)
KIND = "wireguard"


def _key(value: Any) -> bytes:
    raw = base64.b64decode(value) if value else NO_KEY
    return raw if len(raw) == len(NO_KEY) else NO_KEY


def _peer(nla: Any) -> PeerConfig:
    endpoint = None
    ep = nla.get_attr("WGPEER_A_ENDPOINT")
    if ep is not None and ep.get("addr"):
        endpoint = (ip_address(ep["addr"]), int(ep["port"]))
    allowed = frozenset(
        ip_network(a["addr"], strict=False)
        for a in nla.get_attr("WGPEER_A_ALLOWEDIPS") or ()
        if a.get("addr")
    )
    return PeerConfig(
        _key(nla.get_attr("WGPEER_A_PUBLIC_KEY")),
        endpoint,
        allowed,
        int(nla.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
        _key(nla.get_attr("WGPEER_A_PRESHARED_KEY")),
    )


class KernelDevice:
    """The link `name` of kind wireguard in the agent's namespace; `ipr` gives the backend's
    rtnetlink socket as it is now (the backend opens a fresh one after a failure)."""

    kind = "kernel"

    def __init__(self, name: str, ipr: Callable[[], AsyncIPRoute]) -> None:
        self.name = name
        self._ipr = ipr
        self._wg: AsyncWireGuard | None = None

    def __str__(self) -> str:
        return f"the kernel's wireguard ({self.name})"

    @staticmethod
    async def create(ipr: AsyncIPRoute, name: str) -> bool:
        """Make the link (a link of that name and another kind is deleted first); False when
        the kernel has no WireGuard. Reuses a wireguard link that is there."""
        try:
            [link] = await ipr.link("get", ifname=name)
        except NetlinkError as err:
            if err.code != errno.ENODEV:
                raise
        else:
            if link.get(("linkinfo", "kind")) == KIND:
                return True
            kind = link.get(("linkinfo", "kind")) or "tun"
            log.warning("device %s is a %s device, not wireguard: deleting it", name, kind)
            await ipr.link("del", index=link["index"])
        try:
            await ipr.link("add", ifname=name, kind=KIND)
        except NetlinkError as err:
            if err.code in (errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
        return True

    async def _socket(self) -> AsyncWireGuard:
        """The generic netlink socket, bound to the wireguard family (pyroute2 looks its id up
        in `setup_endpoint`, which its `info` and `set` do not call)."""
        if self._wg is None:
            wg = AsyncWireGuard()
            try:
                await wg.setup_endpoint()
            except Exception:
                wg.close()
                raise
            self._wg = wg
        return self._wg

    async def ensure(self, cheap: bool = False) -> bool:
        """The link present; True when it had to be made again (it is empty then)."""
        try:
            [link] = await self._ipr().link("get", ifname=self.name)
            if link.get(("linkinfo", "kind")) == KIND:
                return False
        except NetlinkError as err:
            if err.code != errno.ENODEV:
                raise
        if not await self.create(self._ipr(), self.name):
            raise NetlinkError(errno.EOPNOTSUPP, "the kernel no longer takes wireguard links")
        return True

    async def answers(self) -> bool:
        return True

    async def get(self) -> DeviceState:
        state = DeviceState()
        async for msg in await (await self._socket()).info(self.name):
            if (err := msg["header"].get("error")) is not None:
                raise err
            if (key := msg.get_attr("WGDEVICE_A_PRIVATE_KEY")) is not None:
                state.private_key = _key(key)
            if (port := msg.get_attr("WGDEVICE_A_LISTEN_PORT")) is not None:
                state.listen_port = int(port)
            for nla in msg.get_attr("WGDEVICE_A_PEERS") or ():
                peer = _peer(nla)
                have = state.peers.get(peer.public_key)
                if have is not None:  # a peer split over two messages
                    peer = PeerConfig(
                        peer.public_key,
                        peer.endpoint or have.endpoint,
                        peer.allowed_ips | have.allowed_ips,
                        peer.keepalive or have.keepalive,
                        peer.psk if peer.psk != NO_KEY else have.psk,
                    )
                state.peers[peer.public_key] = peer
        return state

    async def set(
        self,
        private_key: bytes | None = None,
        listen_port: int | None = None,
        remove: list[bytes] | None = None,
        upsert: list[PeerConfig] | None = None,
    ) -> None:
        wg = await self._socket()
        if private_key is not None or listen_port is not None:
            key = encode_key(private_key) if private_key is not None else None
            await wg.set(self.name, private_key=key, listen_port=listen_port)
        for public in remove or ():
            await wg.set(self.name, peer={"public_key": encode_key(public), "remove": True})
        for peer in upsert or ():
            spec: dict[str, Any] = {
                "public_key": encode_key(peer.public_key),
                "preshared_key": encode_key(peer.psk),
                "persistent_keepalive": peer.keepalive,
                "replace_allowed_ips": True,
                "allowed_ips": [str(n) for n in sorted(peer.allowed_ips, key=str)],
            }
            if peer.endpoint is not None:
                spec["endpoint_addr"], spec["endpoint_port"] = (
                    str(peer.endpoint[0]),
                    peer.endpoint[1],
                )
            await wg.set(self.name, peer=spec)

    async def close(self) -> None:
        if self._wg is not None:
            self._wg.close()
            self._wg = None
