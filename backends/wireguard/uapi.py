"""WireGuard's configuration as data, and its text spelling on the cross-platform userspace
API (UAPI) that wireguard-go serves on a unix socket (pure: bytes in, state out).

Theory of operation: a request is `get=1\n\n` or `set=1\n` followed by `key=value` lines and a
blank line; the answer to both ends with `errno=N` and a blank line (0: done). Keys are hex.
In a `get` answer the device's lines come first, then each peer's, each peer opened by its
`public_key=` line. In a `set`, a peer's lines follow its `public_key=` line too:
`remove=true` deletes it; `replace_allowed_ips=true` before its `allowed_ip=` lines makes them
the whole list. A `PeerConfig` is one peer as the backend wants it (and as a dump gives it
back), a `DeviceState` the whole device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import ClassVar

from .keys import KEY_LEN, encode_key

NO_KEY = bytes(KEY_LEN)  # a preshared key of zeros is no preshared key
Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


class UapiError(RuntimeError):
    """The device refused a request (`errno`), or its answer is not the protocol."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class PeerConfig:
    """One peer: what identifies it (`public_key`) and what the backend sets for it."""

    kind: ClassVar[str] = "peer"
    public_key: bytes
    endpoint: tuple[Address, int] | None
    allowed_ips: frozenset[Network]
    keepalive: int = 0
    psk: bytes = NO_KEY

    @property
    def key(self) -> bytes:
        return self.public_key

    @property
    def slot(self) -> tuple[str, bytes]:
        """Its identity on the device, as `reconcile.diff` and `KernelView` match entries."""
        return ("peer", self.public_key)

    def __str__(self) -> str:
        ips = ",".join(str(n) for n in sorted(self.allowed_ips, key=str)) or "(none)"
        end = format_endpoint(self.endpoint) if self.endpoint else "(none)"
        return f"peer {encode_key(self.public_key)} endpoint {end} allowed-ips {ips}"


@dataclass
class DeviceState:
    """A device as a `get` gives it: its keys, port and peers by public key."""

    private_key: bytes = NO_KEY
    listen_port: int = 0
    peers: dict[bytes, PeerConfig] = field(default_factory=dict)


def format_endpoint(endpoint: tuple[Address, int]) -> str:
    ip, port = endpoint
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _parse_endpoint(text: str) -> tuple[Address, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(text)
    return ip_address(host.strip("[]")), int(port)


def _hex_key(value: str) -> bytes:
    raw = bytes.fromhex(value)
    if len(raw) != KEY_LEN:
        raise ValueError(value)
    return raw


GET = b"get=1\n\n"


def check_errno(text: str) -> str:
    """The answer without its `errno=0` line; UapiError when the errno is not 0 or missing."""
    lines = text.rstrip("\n").split("\n")
    last = lines[-1] if lines else ""
    if not last.startswith("errno="):
        raise UapiError(f"wireguard device answered without an errno line: {text[-200:]!r}")
    try:
        code = int(last[len("errno=") :])
    except ValueError:
        raise UapiError(f"wireguard device answered a bad errno line {last!r}") from None
    if code:
        raise UapiError(f"wireguard device refused the request (errno {code})", code)
    return "\n".join(lines[:-1])


def parse_get(text: str) -> DeviceState:
    """A `get=1` answer (its `errno=` line included) as a DeviceState."""
    state = DeviceState()
    peer: dict | None = None
    peers: list[dict] = []
    for line in check_errno(text).split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(f"wireguard device answered a line without '=': {line[:100]!r}")
        try:
            if key == "public_key":
                peer = {"public_key": _hex_key(value), "allowed_ips": set()}
                peers.append(peer)
            elif peer is None:
                if key == "private_key":
                    state.private_key = _hex_key(value)
                elif key == "listen_port":
                    state.listen_port = int(value)
            elif key == "endpoint":
                peer["endpoint"] = _parse_endpoint(value)
            elif key == "allowed_ip":
                peer["allowed_ips"].add(ip_network(value, strict=False))
            elif key == "persistent_keepalive_interval":
                peer["keepalive"] = int(value)
            elif key == "preshared_key":
                peer["psk"] = _hex_key(value)
        except ValueError:
            raise UapiError(f"wireguard device answered a bad {key} line: {line[:100]!r}") from None
    for p in peers:
        p["allowed_ips"] = frozenset(p["allowed_ips"])
        p.setdefault("endpoint", None)
        state.peers[p["public_key"]] = PeerConfig(**p)
    return state


def set_request(
    private_key: bytes | None = None,
    listen_port: int | None = None,
    remove: Iterable[bytes] = (),
    upsert: Iterable[PeerConfig] = (),
) -> bytes:
    """A `set=1` request: the device's key and port when given, then the peers to remove (by
    public key), then the peers to create or change, each with its whole allowed-ips list."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    for key in remove:
        lines += [f"public_key={key.hex()}", "remove=true"]
    for peer in upsert:
        lines += [f"public_key={peer.public_key.hex()}", f"preshared_key={peer.psk.hex()}"]
        if peer.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
        lines += [f"persistent_keepalive_interval={peer.keepalive}", "replace_allowed_ips=true"]
        lines += [f"allowed_ip={net}" for net in sorted(peer.allowed_ips, key=str)]
    return ("\n".join(lines) + "\n\n").encode()
