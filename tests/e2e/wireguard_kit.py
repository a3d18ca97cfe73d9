"""What the wireguard e2e tests share: the scripts they run inside lab namespaces (a capture
on the switch, a UDP listener and sender), the device as wireguard-go reports it on the
agent's socket, the lease records, and tidying /var/run/wireguard after a lab."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from backends.wireguard.keys import decode_key
from backends.wireguard.uapi import DeviceState, parse_get

CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}}
PORT = 51820
WATCHED = Path("/var/run/wireguard")  # wireguard-go's own socket paths: the agent links them

# Every frame on every port of the switch, for `seconds`: how many, how many carried WireGuard
# (UDP over IPv4 or IPv6 to or from its port), how many held the pattern anywhere.
CAPTURE = r"""
import json, socket, struct, sys, time
seconds, pattern, port = float(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3])
def udp_ports(data):
    if data[12:14] == b"\x08\x00" and data[23] == 17:
        at = 14 + (data[14] & 15) * 4
    elif data[12:14] == b"\x86\xdd" and data[20] == 17:
        at = 54
    else:
        return ()
    return struct.unpack("!HH", data[at:at + 4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
print("capturing", flush=True)
frames = wg = seen = 0
end = time.monotonic() + seconds
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data = s.recv(65535)
    except TimeoutError:
        break
    frames += 1
    seen += pattern in data
    wg += port in udp_ports(data)
print(json.dumps({"frames": frames, "wireguard": wg, "pattern": seen}), flush=True)
"""

# Prints every datagram that reaches UDP 9999 for `seconds` (over IPv6 with a second arg "6").
LISTENER = r"""
import socket, sys, time
six = sys.argv[2:] == ["6"]
s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("::" if six else "0.0.0.0", 9999))
print("listening", flush=True)
end = time.monotonic() + float(sys.argv[1])
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        print(s.recv(4096).hex(), flush=True)
    except TimeoutError:
        break
"""

SENDER = r"""
import socket, sys, time
dst, payload, count = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(payload, (dst, 9999))
    time.sleep(0.02)
"""


def need_wireguard_go() -> None:
    if shutil.which("wireguard-go") is None:
        pytest.skip("wireguard-go is not installed (deploy/run-tests.sh installs it)")


def drop_dangling_links() -> None:
    """The symlinks a lab's agents left in /var/run/wireguard that point at nothing now (their
    lab's directory is gone): only wireguard-go looks at them, and only while it runs."""
    for link in WATCHED.glob("flannel-wg*.sock"):
        if link.is_symlink() and not link.exists():
            link.unlink(missing_ok=True)


def sock(c, node) -> Path:
    return c.state_dir(node) / "wireguard" / "flannel-wg.sock"


def device(c, node) -> DeviceState:
    """The node's WireGuard device as wireguard-go reports it on the agent's socket."""
    return parse_get(ask(sock(c, node), b"get=1\n\n"))


def uapi_set(c, node, request: bytes) -> None:
    assert ask(sock(c, node), request).endswith("errno=0\n\n")


def record(c, node) -> dict:
    return json.loads(c.lab.etcdctl("get", "--print-value-only", c.lease_key(c.subnet(node))))


def node_key(c, node) -> bytes:
    return decode_key(record(c, node)["BackendData"]["PublicKey"])


def peers_by_subnet(state: DeviceState) -> dict[str, bytes]:
    return {str(net): p.public_key for p in state.peers.values() for net in p.allowed_ips}


def in_ns(c, ns: str, script: str, *args: str) -> subprocess.Popen[str]:
    """A Python script in namespace `ns`, its stdout piped; the caller ends it."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "capturing" / "listening": it is ready
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 20) -> list[str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return [line for line in out.splitlines() if line]


def starts(c, node) -> float:
    return c.metric_samples(node).get("flannel_wireguard_go_starts_total", 0.0)


def ask(path, request: bytes) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(request)
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode()


def comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def comms(lab, node) -> list[str]:
    return [comm(pid) for pid in lab.run(node.ns, "ip", "netns", "pids", node.ns).stdout.split()]
