"""What the VM lab does on its VMs and what it proves: provisioning as the Vagrantfile does
(the repository copied to /vagrant like its rsync synced folder, deploy/vagrant-provision.sh
with the same variables), Docker on the flannel subnet through the README's drop-in, then
each check of the table, every one able to fail.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .machines import VM, VMError

ROOT = Path(__file__).resolve().parents[2]
NETWORK = "10.244.0.0/16"
CONTAINER = "c1"
BUSYBOX_IMAGE = "vmlab/busybox"
STREAM_INTERVAL = 0.1  # seconds between the echoes of the ping stream across restarts
# log lines that mean the unit's sandbox refused the agent something
DENIED = r"Permission denied|Operation not permitted|Read-only file system|EPERM|EACCES"

CHECKS = (
    "flanneld active",
    "active only after subnet.env",
    "docker0 on FLANNEL_SUBNET, MTU",
    "container pings every other VM",
    "restart: same subnet, stream",
    "stop, start: same subnet",
    "reboot brings it all back",
    "hardening in force, nothing denied",
)


@dataclass
class Outcome:
    ok: bool
    detail: str = ""


@dataclass
class Report:
    """check -> node -> outcome; a check not run for a node is missing."""

    results: dict[str, dict[str, Outcome]] = field(default_factory=dict)

    def record(self, check: str, node: str, ok: bool, detail: str = "") -> bool:
        self.results.setdefault(check, {})[node] = Outcome(ok, detail)
        return ok

    def passed(self, nodes: list[str]) -> bool:
        return all(
            check in self.results
            and all(n in self.results[check] and self.results[check][n].ok for n in nodes)
            for check in CHECKS
        )


def rsync_excludes() -> list[str]:
    """The Vagrantfile's rsync__exclude list, so /vagrant holds what Vagrant would copy."""
    text = (ROOT / "Vagrantfile").read_text()
    m = re.search(r"rsync__exclude:\s*\[([^\]]*)\]", text)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else []


def docker_dropin() -> str:
    """The README's docker.service drop-in: the indented block after the line that says
    `systemctl edit docker`."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if "`systemctl edit docker`" in ln), None)
    if start is None:
        raise VMError("README.md has no Docker drop-in (after a line with `systemctl edit docker`)")
    block, i = [], start + 1
    while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
        if lines[i].strip() or block:
            block.append(lines[i][4:])
        i += 1
    text = "\n".join(block).strip() + "\n"
    if "EnvironmentFile=/run/flannel/docker_opts.env" not in text or "$DOCKER_OPTS" not in text:
        raise VMError("README.md's Docker drop-in no longer reads /run/flannel/docker_opts.env")
    return text


def env_of(vm: VM, path: str = "/run/flannel/subnet.env") -> dict[str, str]:
    out = vm.must(f"cat {path}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


class Scenario:
    def __init__(
        self, vms: list[VM], backend: str, say: Callable[[str], None], slow: float
    ) -> None:
        self.vms, self.backend, self.say = vms, backend, say
        self.slow = slow  # timeouts are multiplied by this (3 under TCG emulation)
        self.report = Report()
        self.subnets: dict[str, str] = {}  # node -> FLANNEL_SUBNET after provisioning
        self.containers: dict[str, str] = {}  # node -> container IP

    def t(self, seconds: float) -> float:
        return seconds * self.slow

    def each(self, fn: Callable[[VM], object], vms: list[VM] | None = None) -> list[object]:
        vms = self.vms if vms is None else vms
        with ThreadPoolExecutor(max_workers=len(vms)) as pool:
            return list(pool.map(fn, vms))

    # -- provisioning ---------------------------------------------------------------------

    def provision(self, vm: VM) -> None:
        """What `vagrant up` does for this node: sync the folder, run the provisioner."""
        excludes = " ".join(f"--exclude={shlex.quote(e)}" for e in rsync_excludes())
        vm.must(f"rsync -a --delete {excludes} /mnt/vmlab-repo/ /vagrant/", self.t(60))
        env = {
            "NODE_IP": vm.ip,
            "ETCD_IP": self.vms[0].ip,
            "BACKEND": self.backend,
            "FLANNEL_NETWORK": NETWORK,
            "WHEELS": "/mnt/vmlab-wheels",
        }
        assign = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        out = vm.must(f"{assign} bash /vagrant/deploy/vagrant-provision.sh 2>&1", self.t(300))
        self.say(out.strip().splitlines()[-1])  # "node1: flanneld ready, subnet ..."

    def docker(self, vm: VM) -> None:
        """Docker on the flannel subnet: the README's drop-in, a local busybox image, one
        container that comes back after a reboot."""
        dropin = docker_dropin()
        vm.must("ip link del cni0 2>/dev/null; mkdir -p /etc/systemd/system/docker.service.d")
        vm.must(f"cat >/etc/systemd/system/docker.service.d/flannel.conf <<'EOF'\n{dropin}EOF")
        vm.must("systemctl daemon-reload && systemctl enable -q --now docker", self.t(180))
        vm.must(
            f"docker image inspect {BUSYBOX_IMAGE} >/dev/null 2>&1 || "
            f"docker import /usr/local/share/vmlab/busybox.tar {BUSYBOX_IMAGE}",
            self.t(120),
        )
        vm.must(
            f"docker rm -f {CONTAINER} >/dev/null 2>&1; docker run -d --restart=always "
            f"--name {CONTAINER} {BUSYBOX_IMAGE} sleep 1000000",
            self.t(120),
        )

    def container_ip(self, vm: VM) -> str:
        deadline = time.monotonic() + self.t(60)
        while True:
            out = vm.sh(f"docker inspect -f '{{{{.NetworkSettings.IPAddress}}}}' {CONTAINER}")
            if out.ok and out.out.strip():
                self.containers[vm.name] = out.out.strip()
                return self.containers[vm.name]
            if time.monotonic() > deadline:
                raise VMError(f"{vm.name}: container {CONTAINER} has no address: {out.err}")
            time.sleep(1)

    # -- the checks -----------------------------------------------------------------------

    def wait_active(self, vm: VM, timeout: float = 150) -> bool:
        res = vm.sh(
            f"for i in $(seq {int(self.t(timeout))}); do systemctl is-active -q flanneld"
            " && exit 0; sleep 1; done; exit 1",
            self.t(timeout) + 30,
        )
        return res.ok

    def check_active(self, vm: VM, check: str = "flanneld active") -> bool:
        state = vm.sh("systemctl is-active flanneld").out.strip()
        return self.report.record(check, vm.name, state == "active", f"is-active: {state}")

    def notify_order(self, vm: VM) -> tuple[bool, str]:
        """The unit is Type=notify and became active after the agent wrote subnet.env (and
        after it started): ExecMainStart <= mtime(subnet.env) <= ActiveEnter."""
        out = vm.must(
            "systemctl show flanneld -p Type -p ExecMainStartTimestampMonotonic "
            "-p ActiveEnterTimestampMonotonic; "
            "echo mtime=$(stat -c %.9Y /run/flannel/subnet.env); "
            "read -r up _ </proc/uptime; echo up=$up realtime=$(date +%s.%N)"
        )
        kv = dict(line.split("=", 1) for line in out.split() if "=" in line)
        # the file's mtime (realtime clock) moved onto the clock of the unit's timestamps
        file_mono = float(kv["mtime"]) - (float(kv["realtime"]) - float(kv["up"]))
        start = int(kv["ExecMainStartTimestampMonotonic"]) / 1e6
        active = int(kv["ActiveEnterTimestampMonotonic"]) / 1e6
        ok = kv["Type"] == "notify" and start <= file_mono + 0.01 and file_mono <= active + 0.01
        return ok, (
            f"Type={kv['Type']}, started {start:.2f}s, subnet.env {file_mono:.2f}s, "
            f"active {active:.2f}s (boot clock)"
        )

    def check_notify(self, vm: VM) -> bool:
        ok, detail = self.notify_order(vm)
        return self.report.record("active only after subnet.env", vm.name, ok, detail)

    def docker_net(self, vm: VM) -> tuple[bool, str]:
        env = env_of(vm)
        subnet, mtu = env["FLANNEL_SUBNET"], env["FLANNEL_MTU"]
        addrs = vm.must("ip -4 -o addr show dev docker0 | awk '{print $4}'").split()
        bridge_mtu = vm.must("cat /sys/class/net/docker0/mtu").strip()
        cmtu = vm.must(f"docker exec {CONTAINER} cat /sys/class/net/eth0/mtu").strip()
        cip = self.container_ip(vm)
        inside = ipaddress.ip_address(cip) in ipaddress.ip_interface(subnet).network
        ok = addrs == [subnet] and bridge_mtu == mtu and cmtu == mtu and inside
        return ok, (
            f"docker0 {' '.join(addrs) or '-'} MTU {bridge_mtu}, container {cip} MTU "
            f"{cmtu}; subnet.env {subnet} MTU {mtu}"
        )

    def check_docker(self, vm: VM) -> bool:
        ok, detail = self.docker_net(vm)
        return self.report.record("docker0 on FLANNEL_SUBNET, MTU", vm.name, ok, detail)

    def pings(self, vm: VM, count: int = 2) -> tuple[bool, str]:
        """The container on `vm` pings the container on every other VM."""
        misses = []
        for other in self.vms:
            if other is vm:
                continue
            dst = self.containers[other.name]
            res = vm.sh(f"docker exec {CONTAINER} ping -c {count} -W 3 {dst}", self.t(30))
            if not res.ok:
                misses.append(f"{other.name} {dst}")
        return not misses, (
            "no answer from " + ", ".join(misses)
        ) if misses else f"answered by {len(self.vms) - 1} VM(s)"

    def check_pings(self, vm: VM) -> bool:
        ok, detail = self.pings(vm)
        return self.report.record("container pings every other VM", vm.name, ok, detail)

    def hardening(self, vm: VM) -> tuple[bool, str]:
        """The unit's sandbox is in force on the running agent, and it refused it nothing."""
        pid = vm.must("systemctl show -p MainPID --value flanneld").strip()
        status = vm.must(f"cat /proc/{pid}/status")
        caps = {k: v for k, v in re.findall(r"^(Cap\w+|NoNewPrivs):\s*(\S+)", status, re.M)}
        want = f"{(1 << 12) | (1 << 13):016x}"  # CAP_NET_ADMIN, CAP_NET_RAW
        root_ro = (
            vm.sh(f"nsenter -t {pid} -m test -w /etc").rc != 0
            and vm.sh(f"nsenter -t {pid} -m sh -c ': >/usr/.vmlab-probe'").rc != 0
        )
        denied = vm.sh(f"journalctl -b -u flanneld --no-pager -o cat | grep -E '{DENIED}'")
        restarts = vm.must("systemctl show -p NRestarts --value flanneld").strip()
        status_ok = vm.sh("/opt/flanneld/bin/flannelctl status", self.t(30))
        fwd = vm.sh("iptables -S FLANNEL-FWD")
        opts = vm.sh("grep -q '^DOCKER_OPTS=' /run/flannel/docker_opts.env")
        sock = vm.sh("test -S /var/lib/flanneld/flanneld.sock")
        problems = []
        if caps.get("CapBnd") != want or caps.get("CapEff") != want:
            problems.append(f"capabilities bnd {caps.get('CapBnd')} eff {caps.get('CapEff')}")
        if caps.get("NoNewPrivs") != "1":
            problems.append("NoNewPrivileges off")
        if not root_ro:
            problems.append("the agent can write /etc or /usr (ProtectSystem off)")
        if denied.ok:
            problems.append(f"denied: {denied.out.strip().splitlines()[0][:100]}")
        if restarts != "0":
            problems.append(f"{restarts} automatic restarts")
        if not status_ok.ok:
            problems.append(f"flannelctl status failed: {status_ok.out.strip()[-100:]}")
        if not fwd.ok:
            problems.append("no FLANNEL-FWD iptables chain")
        if not opts.ok:
            problems.append("ExecStartPost wrote no /run/flannel/docker_opts.env")
        if not sock.ok:
            problems.append("no status socket in /var/lib/flanneld")
        detail = "; ".join(problems) or (
            f"caps {want} only, / read-only, subnet.env + docker_opts.env + status socket "
            "written, iptables rules in place, no denial in the journal"
        )
        return not problems, detail

    def check_hardening(self, vm: VM) -> bool:
        """Checked after provisioning and again after the reboot: a failure stays."""
        check = "hardening in force, nothing denied"
        ok, detail = self.hardening(vm)
        before = self.report.results.get(check, {}).get(vm.name)
        if before is not None and not before.ok:
            ok, detail = False, f"{before.detail}; after the reboot: {detail}"
        return self.report.record(check, vm.name, ok, detail)

    def restart_stream(self) -> None:
        """`systemctl restart flanneld` on every VM, one after another, while node1's container
        pings every other VM's container every 0.1 s: the same subnet afterwards, a new agent
        process, and (host-gw, vxlan) no echo lost; (udp) the stream is answered again."""
        src, check = self.vms[0], "restart: same subnet, stream"
        for other in self.vms[1:]:
            dst = self.containers[other.name]
            src.must(
                f"setsid docker exec {CONTAINER} sh -c 'exec ping -i {STREAM_INTERVAL} {dst} "
                f">/tmp/stream-{other.name} 2>&1' </dev/null >/dev/null 2>&1 &"
            )
        time.sleep(3)
        details = {}
        for vm in self.vms:
            before = vm.must("systemctl show -p MainPID --value flanneld").strip()
            vm.must("systemctl restart flanneld", self.t(120))
            pid = vm.must("systemctl show -p MainPID --value flanneld").strip()
            subnet = env_of(vm)["FLANNEL_SUBNET"]
            same = subnet == self.subnets[vm.name]
            active = vm.sh("systemctl is-active flanneld").out.strip() == "active"
            ok = same and active and pid != before
            self.report.record(check, vm.name, ok)
            details[vm.name] = (
                f"subnet {subnet} ({'same' if same else 'CHANGED'}), "
                f"{'active' if active else 'NOT active'}, pid {before} -> {pid}"
            )
        for other in self.vms[1:]:  # answers flowing again (udp: the agents carry them)
            self._wait_flowing(src, f"/tmp/stream-{other.name}", self.t(30))
        src.must(f"docker exec {CONTAINER} killall -INT ping && sleep 1")
        for other in self.vms[1:]:
            ok, what = self.stream_result(
                src.must(f"docker exec {CONTAINER} cat /tmp/stream-{other.name}")
            )
            details[src.name] += f"; stream to {other.name}: {what}"
            prev = self.report.results[check][src.name].ok
            self.report.record(check, src.name, prev and ok)
        for vm in self.vms:
            self.report.results[check][vm.name].detail = details[vm.name]

    def _wait_flowing(self, vm: VM, stream: str, timeout: float) -> bool:
        """Wait (at most `timeout` s) until a running ping stream gets answers again: its
        last answered sequence number grows across 1 s, twice."""
        script = f"docker exec {CONTAINER} tail -n 1 {stream}"
        deadline, last, growing = time.monotonic() + timeout, -1, 0
        while time.monotonic() < deadline:
            m = re.search(r"seq=(\d+) ", vm.sh(script).out)
            seq = int(m.group(1)) if m else -1
            growing = growing + 1 if seq > last >= 0 else 0
            if growing >= 2:
                return True
            last = seq
            time.sleep(1)
        return False

    def stream_result(self, out: str) -> tuple[bool, str]:
        """Judge a ping stream stopped by SIGINT: every echo answered, except maybe the last
        (still in flight when it was stopped); for udp, answers after the restarts."""
        m = re.search(r"(\d+) packets transmitted", out)
        seqs = {int(s) for s in re.findall(r"seq=(\d+) ", out)}
        if m is None or not seqs:
            return False, f"no stream result ({out.strip()[-120:]!r})"
        sent = int(m.group(1))
        lost = sorted(set(range(sent)) - seqs)
        if self.backend == "udp":  # flannel0 goes with the agent: answering again is it
            again = max(seqs) > (max(lost) if lost else -1)
            what = f"{len(lost)}/{sent} lost while udp restarted"
            return again, what + ("" if again else ", NOT answered again")
        ok = sent > 50 and lost in ([], [sent - 1])
        return ok, f"{sent - len(lost)}/{sent} answered" + (
            f", lost seq {lost[:10]}" if lost and lost != [sent - 1] else ""
        )

    def stop_start(self, vm: VM) -> bool:
        """`systemctl stop` keeps subnet.env (and, host-gw/vxlan, the datapath); `start`
        brings the unit back on the same subnet."""
        vm.must("systemctl stop flanneld", self.t(60))
        state = vm.sh("systemctl is-active flanneld").out.strip()
        kept = vm.sh("test -s /run/flannel/subnet.env").ok
        detail = [f"stopped: {state}", "subnet.env kept" if kept else "subnet.env GONE"]
        ok = state in ("inactive", "failed") and kept
        if self.backend != "udp":
            alive, _ = self.pings(vm, count=1)
            detail.append("pings while stopped" if alive else "NO ping while stopped")
            ok &= alive
        vm.must("systemctl start flanneld", self.t(150))
        active = vm.sh("systemctl is-active flanneld").out.strip() == "active"
        subnet = env_of(vm)["FLANNEL_SUBNET"]
        order_ok, _ = self.notify_order(vm)
        pings_ok, _ = self.pings(vm)
        ok &= active and subnet == self.subnets[vm.name] and order_ok and pings_ok
        detail.append(
            f"started: {'active' if active else 'NOT active'}, subnet {subnet}"
            f"{'' if order_ok else ', active before subnet.env'}"
            f"{'' if pings_ok else ', pings FAIL'}"
        )
        return self.report.record("stop, start: same subnet", vm.name, ok, "; ".join(detail))

    def reboot_all(self) -> None:
        """Reboot every VM at once (etcd's too): the agent, Docker and the container come
        back by themselves, the unit active only after subnet.env again, on the same subnet,
        and every container answers every other VM's again."""
        problems = dict(zip([vm.name for vm in self.vms], self.each(self._reboot), strict=True))
        for vm in self.vms:
            if not problems[vm.name]:
                ping_ok, why = self.pings(vm)  # the containers may have new addresses
                if not ping_ok:
                    problems[vm.name].append(why)
        for vm in self.vms:
            self.report.record(
                "reboot brings it all back",
                vm.name,
                not problems[vm.name],
                "; ".join(problems[vm.name])
                or "back by itself: active after subnet.env, same "
                "subnet, docker0 and the container on it, every other VM's container answers",
            )

    def _reboot(self, vm: VM) -> list[str]:
        old = vm.agent.boot_id
        vm.must("(sleep 1; systemctl reboot) </dev/null >/dev/null 2>&1 &")
        vm.agent.wait_boot(self.t(200), not_boot=old)
        up = self.wait_active(vm)
        running = (
            f'for i in $(seq {int(self.t(120))}); do [ "$(docker inspect -f '
            f"'{{{{.State.Running}}}}' {CONTAINER} 2>/dev/null)\" = true ] && exit 0; sleep 1;"
            " done; exit 1"
        )
        docker_up = vm.sh(running, self.t(120) + 30).ok
        problems = []
        if not up:
            problems.append("flanneld not active")
        if not docker_up:
            problems.append("container not running")
        if up:
            subnet = env_of(vm)["FLANNEL_SUBNET"]
            if subnet != self.subnets[vm.name]:
                problems.append(f"subnet {subnet} != {self.subnets[vm.name]}")
            order_ok, order = self.notify_order(vm)
            if not order_ok:
                problems.append(order)
        if up and docker_up:
            net_ok, net = self.docker_net(vm)
            if not net_ok:
                problems.append(net)
        return problems
