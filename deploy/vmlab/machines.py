"""The VM lab's machines: a network namespace of its own with a bridge and one tap per VM,
QEMU started inside that namespace (never the host's), and the host end of each VM's guest
agent (a unix socket QEMU connects to the VM's virtio-serial port).

Everything a run makes is named by its prefix: the namespace `<prefix>-net`, the run directory
`<cache>/runs/<prefix>` (overlays, sockets, console logs, QEMU pid files). `teardown(prefix)`
removes all of it, also for a lab left up by --keep or by a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .image import Image

PREFIX_RE = re.compile(r"vl[0-9a-f]{6}")
UNDERLAY = "192.0.2.{}"  # the documentation range: node i is .10+i on the lab's bridge
MEMORY_MIB = 1024


class VMError(RuntimeError):
    """A VM or its guest agent misbehaved; the message says which and what to look at."""


def sh(cmd: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise VMError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()}")
    return res


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class GuestAgent:
    """The host end of deploy/vmlab/guest_agent.py: one request at a time, replies matched by
    id, a new boot told by its boot id."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self.sock: socket.socket | None = None
        self.buf = b""
        self.next_id = 0
        self.boot_id = ""

    def _connect(self, deadline: float) -> socket.socket:
        while self.sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                self.sock = s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise VMError(f"{self.name}: no guest agent socket {self.path}") from None
                time.sleep(0.2)
        return self.sock

    def _send(self, obj: dict, deadline: float) -> None:
        self._connect(deadline).sendall((json.dumps(obj) + "\n").encode())

    def _next(self, deadline: float) -> dict | None:
        """The next message, or None at the deadline."""
        sock = self._connect(deadline)
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            sock.settimeout(min(left, 1.0))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise VMError(f"{self.name}: QEMU closed the guest agent socket (VM gone?)")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:  # a partial line from a VM that reset mid-reply
            return {}

    def wait_boot(self, timeout: float, not_boot: str = "") -> str:
        """Wait for the agent of a boot other than `not_boot`; its boot id."""
        deadline = time.monotonic() + timeout
        next_ask = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_ask:
                self._send({"hello": 1}, deadline)
                next_ask = time.monotonic() + 3
            msg = self._next(min(deadline, next_ask))
            if msg and msg.get("hello") and msg["hello"] != not_boot:
                self.boot_id = msg["hello"]
                return self.boot_id
        raise VMError(f"{self.name}: the guest agent did not answer within {timeout:.0f} s")

    def run(self, script: str, timeout: float = 60) -> Result:
        """Run a bash script in the VM as root; its exit status and output."""
        self.next_id += 1
        rid = self.next_id
        deadline = time.monotonic() + timeout + 10
        self._send({"id": rid, "sh": script, "timeout": timeout}, deadline)
        while (msg := self._next(deadline)) is not None:
            if msg.get("id") == rid:
                return Result(int(msg["rc"]), msg.get("out", ""), msg.get("err", ""))
        raise VMError(f"{self.name}: no answer to `{script[:60]}` within {timeout + 10:.0f} s")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass
class VM:
    index: int
    name: str
    ip: str
    run_dir: Path
    proc: subprocess.Popen | None = None
    agent: GuestAgent = field(init=False)

    def __post_init__(self) -> None:
        self.agent = GuestAgent(self.run_dir / f"{self.name}.agent", self.name)

    @property
    def console_log(self) -> Path:
        return self.run_dir / f"{self.name}.console.log"

    def console_tail(self, lines: int = 15) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def sh(self, script: str, timeout: float = 60) -> Result:
        if self.proc is not None and self.proc.poll() is not None:
            raise VMError(
                f"{self.name}: QEMU exited ({self.proc.returncode}); console:\n"
                + self.console_tail()
            )
        return self.agent.run(script, timeout)

    def must(self, script: str, timeout: float = 60) -> str:
        """Run `script`; its stdout, or VMError with its output when it fails."""
        res = self.sh(script, timeout)
        if not res.ok:
            raise VMError(
                f"{self.name}: `{script.strip()[:80]}` failed ({res.rc}): "
                f"{(res.err or res.out).strip()[-800:]}"
            )
        return res.out


class Machines:
    """The namespace, the bridge, the taps and the VMs of one lab run."""

    def __init__(self, prefix: str, cache: Path, nodes: int, accel: str) -> None:
        self.prefix = prefix
        self.ns = f"{prefix}-net"
        self.run_dir = cache / "runs" / prefix
        self.accel = accel
        self.vms = [
            VM(i, f"node{i}", UNDERLAY.format(10 + i), self.run_dir) for i in range(1, nodes + 1)
        ]
        self.made_ns = False

    def create_network(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=False)
        (self.run_dir / "owner.pid").write_text(f"{os.getpid()}\n")
        sh(["ip", "netns", "add", self.ns])
        self.made_ns = True
        lines = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
        for vm in self.vms:
            lines += [
                f"tuntap add mode tap name tap{vm.index}",
                f"link set tap{vm.index} master br0 up",
            ]
        subprocess.run(
            ["ip", "-n", self.ns, "-batch", "-"],
            input="\n".join(lines) + "\n",
            text=True,
            capture_output=True,
            timeout=30,
            check=True,
        )

    def boot(self, vm: VM, image: Image, shares: dict[str, Path]) -> None:
        """Start `vm`'s QEMU inside the lab namespace, on an overlay of the image."""
        overlay = self.run_dir / f"{vm.name}.qcow2"
        if not overlay.exists():
            sh(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    str(image.rootfs),
                    "-F",
                    "raw",
                    str(overlay),
                ]
            )
        append = (
            f"root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.hostname={vm.name} "
            f"systemd.machine_id={os.urandom(16).hex()} vmlab.ip={vm.ip}/24 "
            "systemd.show_status=auto panic=10"
        )
        cpu = (
            ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
            if self.accel == "kvm"
            else ["-accel", "tcg,thread=multi", "-cpu", "max"]
        )
        cmd = [
            "ip",
            "netns",
            "exec",
            self.ns,
            "qemu-system-x86_64",
            "-name",
            f"{self.prefix}-{vm.name}",
            "-machine",
            "pc",
            *cpu,
            "-smp",
            "1",
            "-m",
            str(MEMORY_MIB),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-kernel",
            str(image.kernel),
            "-initrd",
            str(image.initrd),
            "-append",
            append,
            "-drive",
            f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
            "-netdev",
            f"tap,id=net0,ifname=tap{vm.index},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=net0,mac=52:54:00:00:02:{10 + vm.index:02x}",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            f"socket,id=agent,path={vm.agent.path},server=on,wait=off",
            "-device",
            "virtserialport,chardev=agent,name=vmlab.agent",
            "-chardev",
            f"socket,id=console,path={self.run_dir / vm.name}.console,server=on,"
            f"wait=off,logfile={vm.console_log}",
            "-serial",
            "chardev:console",
            "-pidfile",
            str(self.run_dir / f"{vm.name}.pid"),
        ]
        for tag, path in shares.items():
            cmd += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none,readonly=on"]
        with open(self.run_dir / f"{vm.name}.qemu.log", "ab") as log:
            vm.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def close(self, keep: bool) -> None:
        for vm in self.vms:
            vm.agent.close()
        if keep:
            (self.run_dir / "kept").touch()
        else:
            teardown(self.prefix, self.run_dir.parent.parent)


def _qemu_pids(run_dir: Path) -> list[int]:
    """The QEMU processes of a run: from its pid files, only if still QEMU of this run."""
    pids = []
    for pidfile in run_dir.glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"qemu-system" in cmdline and str(run_dir).encode() in cmdline:
                pids.append(pid)
    return pids


def teardown(prefix: str, cache: Path) -> list[str]:
    """Kill the run's VMs, delete its namespace and run directory; what was removed."""
    if not PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"not a VM lab prefix: {prefix!r} (vl and 6 hex digits)")
    run_dir, ns, removed = cache / "runs" / prefix, f"{prefix}-net", []
    pids = _qemu_pids(run_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
    if pids:
        removed.append(f"{len(pids)} VM(s)")
    if ns in sh(["ip", "netns", "list"], check=False).stdout.split():
        for pid in sh(["ip", "netns", "pids", ns], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        sh(["ip", "netns", "del", ns], check=False)
        removed.append(f"namespace {ns}")
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(str(run_dir))
    return removed


def stale_runs(cache: Path) -> list[str]:
    """Runs whose lab process is gone (killed before it could tear down) and that were not
    left up by --keep."""
    return [
        prefix
        for prefix in kept_runs(cache)
        if not running(cache, prefix) and not (cache / "runs" / prefix / "kept").exists()
    ]


def running(cache: Path, prefix: str) -> bool:
    """True while the lab process that made the run is alive (the run is in use)."""
    try:
        owner = int((cache / "runs" / prefix / "owner.pid").read_text().strip())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{owner}").exists()


def kept_runs(cache: Path) -> list[str]:
    runs = cache / "runs"
    return (
        sorted(p.name for p in runs.iterdir() if PREFIX_RE.fullmatch(p.name))
        if runs.is_dir()
        else []
    )
