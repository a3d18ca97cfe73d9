"""The udp kernel fast path's pure half: what goes into its BPF maps, and the loader's
instruction patching. No I/O (`kernel` does the bpf(2) calls and the tc attachment).

Maps (the layouts are flannel_tc.c's structs, little-endian host, addresses in network order):
- config: ARRAY[1] of {local IP (the UDP socket's address), own subnet, its mask, the underlay
  ifindex, flannel0's ifindex, Port}; Port 0 means "not configured": all falls through.
- routes: LPM_TRIE {prefixlen, subnet} -> {peer PublicIP, peer Port, flags}, one entry per
  peer of `core.Routes` (longest prefix, as `Routes.lookup`). Egress encapsulates to the entry
  of the destination when its flag `ROUTE_KERNEL` says the peer runs the fast path too (a
  packet the kernel encapsulates may carry an unfinished TCP/UDP checksum, which a NIC
  finishes but a veth underlay does not, and a userspace receiver would then write a packet
  its kernel drops; so packets to other peers go through userspace, which finishes them);
  ingress admits a datagram only when the entry of the inner SOURCE names the
  datagram's sender, which is `Routes.check`'s spoofing rule and implies a known sender.
- stats: ARRAY of u64 counters, named by `STATS`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network

from flanneld.core.options import FlagError, parse_bool

from .core import Routes

KERNEL_ENV = "FLANNELD_UDP_KERNEL"

# flannel_tc.c's enum, in order; `kernel:<name>` in the backend's stats
STATS = (
    "encapsulated",
    "egress_misses",
    "egress_fallbacks",
    "egress_errors",
    "decapsulated",
    "ingress_fallbacks",
    "ingress_errors",
    "egress_userspace_peers",
)
STATS_SLOTS = 8

CONFIG_SIZE = 24
ROUTE_KEY_SIZE = 8
ROUTE_VALUE_SIZE = 12
ROUTE_KERNEL = 1  # route flag: the peer runs the fast path
MAX_ROUTES = 16384

BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD = 1


class KernelSetting(ValueError):
    """FLANNELD_UDP_KERNEL has a value that is not a boolean."""


def kernel_wanted(environ: Mapping[str, str]) -> bool:
    try:
        return parse_bool(environ.get(KERNEL_ENV, "true"))
    except FlagError as e:
        raise KernelSetting(f"{KERNEL_ENV}: {e}") from None


MIN_KERNEL = (6, 3)  # bpf_skb_adjust_room's BPF_F_ADJ_ROOM_DECAP_L3_IPV4


def kernel_too_old(release: str) -> str | None:
    """Why a kernel of this `uname -r` cannot run the fast path, or None. Older kernels load
    the programs but refuse the decap flag at run time, which would hand every datagram,
    TCP super-packets too, to the socket."""
    m = re.match(r"(\d+)\.(\d+)", release)
    if m is None:
        return f"cannot read the kernel version from {release!r}"
    if (int(m[1]), int(m[2])) < MIN_KERNEL:
        return f"kernel {m[1]}.{m[2]} is older than 6.3 (no decapsulation in bpf_skb_adjust_room)"
    return None


def config_value(
    local_ip: IPv4Address, subnet: IPv4Network, eth_index: int, tun_index: int, port: int
) -> bytes:
    return (
        local_ip.packed
        + subnet.network_address.packed
        + subnet.netmask.packed
        + struct.pack("<III", eth_index, tun_index, port)
    )


def route_key(subnet: IPv4Network) -> bytes:
    return struct.pack("<I", subnet.prefixlen) + subnet.network_address.packed


def route_entries(routes: Routes) -> dict[bytes, bytes]:
    """The routes map's content for this snapshot (`plan` takes peers from a mapping keyed by
    subnet, so no subnet comes twice; if one did, the last peer would hold it)."""
    return {
        route_key(p.subnet): p.public_ip.packed
        + struct.pack("<II", p.port, ROUTE_KERNEL if p.kernel else 0)
        for p in routes.peers
    }


def changes(
    old: Mapping[bytes, bytes], new: Mapping[bytes, bytes]
) -> tuple[dict[bytes, bytes], list[bytes]]:
    """The updates (added or changed keys) and deletions that turn map content `old` into
    `new`; deletions first in the caller, so a full map never refuses an update."""
    updates = {k: v for k, v in new.items() if old.get(k) != v}
    deletes = sorted(k for k in old if k not in new)
    return updates, deletes


def patch_map_fds(
    insns: Sequence[int], relocs: Sequence[tuple[int, str]], fds: Mapping[str, int]
) -> bytes:
    """The program as bytes for BPF_PROG_LOAD: each relocated `ld_imm64 rX, <map>` becomes
    `ld_imm64 rX, map_fd` (src_reg = BPF_PSEUDO_MAP_FD, imm = the fd, second half's imm 0)."""
    words = list(insns)
    for idx, name in relocs:
        x = words[idx]
        if x & 0xFF != BPF_LD_IMM64 or idx + 1 >= len(words):
            raise ValueError(f"relocation {idx} ({name}) is not on an ld_imm64 instruction")
        dst = (x >> 8) & 0x0F
        regs = dst | (BPF_PSEUDO_MAP_FD << 4)
        words[idx] = (x & 0xFFFF00FF) | (regs << 8) | ((fds[name] & 0xFFFFFFFF) << 32)
        words[idx + 1] = 0  # the second half: the fd's upper 32 bits, none
    return b"".join(struct.pack("<Q", w) for w in words)


def stats_values(raw: Sequence[int]) -> dict[str, int]:
    """`kernel:<name>` -> count, from the stats map's slots."""
    return {f"kernel:{name}": raw[i] if i < len(raw) else 0 for i, name in enumerate(STATS)}
