"""subnet.env: the file the CNI plugin, Docker and systemd units read.

Same variables, order and format as the reference; written atomically (temp file, fsync,
rename) with mode 0644. Reading it back gives the previous lease to reuse.
"""

from __future__ import annotations

import os
import tempfile
from ipaddress import IPv4Network, IPv6Network, ip_interface
from pathlib import Path
from typing import Any

from flanneld.core.subnets import first_host


def render(
    network: IPv4Network | None,
    subnet: IPv4Network,
    mtu: int,
    ipmasq: bool,
    network6: IPv6Network | None = None,
    subnet6: IPv6Network | None = None,
) -> str:
    """The reference's lines in its order; the IPv6 pair only for a lease with an IPv6
    subnet, the IPv4 pair only when the network has IPv4 (`network` None: IPv6-only)."""
    v4 = (
        f"FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={first_host(subnet)}\n"
        if network is not None
        else ""
    )
    v6 = (
        f"FLANNEL_IPV6_NETWORK={network6}\nFLANNEL_IPV6_SUBNET={first_host(subnet6)}\n"
        if network6 is not None and subnet6 is not None
        else ""
    )
    return (
        f"{v4}"
        f"{v6}"
        f"FLANNEL_MTU={mtu}\n"
        f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n"
    )


def write(path: str | Path, content: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse(text: str) -> dict[str, str]:
    """KEY=VALUE lines; comments, blanks and optional quotes handled like godotenv."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


def previous_subnet(path: str | Path, key: str = "FLANNEL_SUBNET", version: int = 4) -> Any:
    """The lease subnet named by FLANNEL_SUBNET (or, with `key` FLANNEL_IPV6_SUBNET and
    `version` 6, the IPv6 one) in an existing file, or None."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    value = parse(text).get(key, "")
    if not value or "," in value:
        return None
    try:
        iface = ip_interface(value)
    except ValueError:
        return None
    return iface.network if iface.version == version else None
