"""The virtio-net header that leads every TUN read and write when the TUN has offloads: its
layout, its flag and its GSO types (the subset the agent asks the kernel for: TCPv4 only)."""

from __future__ import annotations

import struct
from typing import Final

VNET: Final = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, offset
VNET_LEN: Final = VNET.size
F_NEEDS_CSUM: Final = 1  # the L4 checksum is partial: csum_start, offset say where
GSO_NONE, GSO_TCPV4 = 0, 1
PLAIN: Final = bytes(VNET_LEN)  # "nothing offloaded": the kernel checks every checksum
