"""subnet.env: the file the CNI plugin, Docker and systemd units read.

Same variables, order and format as the reference; written atomically (temp file, fsync,
rename) with mode 0644. Reading it back gives the previous lease to reuse.
"""

from __future__ import annotations

import os
import tempfile
from ipaddress import IPv4Network, ip_interface
from pathlib import Path

from flanneld.core.subnets import first_host


def render(network: IPv4Network, subnet: IPv4Network, mtu: int, ipmasq: bool) -> str:
    return (
        f"FLANNEL_NETWORK={network}\n"
        f"FLANNEL_SUBNET={first_host(subnet)}\n"
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


def previous_subnet(path: str | Path) -> IPv4Network | None:
    """The lease subnet named by FLANNEL_SUBNET in an existing file, or None."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    value = parse(text).get("FLANNEL_SUBNET", "")
    if not value or "," in value:
        return None
    try:
        iface = ip_interface(value)
    except ValueError:
        return None
    net = iface.network
    return net if isinstance(net, IPv4Network) else None
