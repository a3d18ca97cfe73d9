"""deploy/vmlab.sh: boot N Debian 12 VMs with real systemd, install the agent in each the way
the Vagrantfile does, put Docker on the flannel subnet, and prove the checks of
deploy/vmlab/scenario.py; a progress line per step, then a table; exit 0 only when every check
holds on every VM. Everything the run made is removed on exit, failure or Ctrl-C, unless
--keep (then `--down` removes it).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from flanneld.core.text import table_lines

from . import image as images
from .machines import (
    MEMORY_MIB,
    PREFIX_RE,
    GuestAgent,
    Machines,
    VMError,
    kept_runs,
    running,
    stale_runs,
    teardown,
)
from .scenario import CHECKS, ROOT, Report, Scenario, env_of

BACKENDS = ("host-gw", "vxlan", "udp", "wireguard")
KVM_GET_API_VERSION = 0xAE00
TCG_SLOWDOWN = 3.0  # timeouts under emulation


class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)


class BadInput(RuntimeError):
    """Something about this machine or the arguments stops the lab: one line, cause and fix."""


def kvm_state() -> str:
    """'' when /dev/kvm answers KVM_GET_API_VERSION, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    finally:
        os.close(fd)
    return "" if version == 12 else f"/dev/kvm speaks KVM API {version}, not 12"


def kvm_runs_stock_kernels() -> bool:
    """False where KVM is PVM (kvm_pvm, no VT-x/AMD-V underneath): it runs only kernels built
    as PVM guests; Debian's is not one (tried: it crawls, then stops on an instruction PVM
    cannot emulate)."""
    hardware = any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
    return hardware or not Path("/sys/module/kvm_pvm").exists()


def choose_accel(requested: str, say: Progress) -> str:
    why = kvm_state()
    if requested == "tcg":
        return "tcg"
    if why:
        raise BadInput(
            f"{why}: the VM lab needs KVM; run it on a machine (or a VM with nested "
            "virtualization) where /dev/kvm works, or pass --accel tcg to emulate (slow)"
        )
    if requested == "kvm" or kvm_runs_stock_kernels():
        return "kvm"
    say(
        "KVM here is PVM (kvm_pvm, no VT-x/AMD-V): it runs only PVM guest kernels and "
        "Debian's kernel is not one; the VMs run under QEMU's emulation (TCG) instead"
    )
    return "tcg"


def preflight(nodes: int, cache: Path) -> None:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    available = int(meminfo["MemAvailable"].split()[0]) >> 10
    need = nodes * (MEMORY_MIB + 256) + 512
    if available < need:
        raise BadInput(
            f"{available} MiB of memory available, {need} MiB needed for {nodes} VMs of "
            f"{MEMORY_MIB} MiB; stop something or use fewer --nodes"
        )
    cache.mkdir(parents=True, exist_ok=True)
    need_disk = (1 << 30) * (2 + (0 if images.image_cached(cache) else 5))
    free = shutil.disk_usage(cache).free
    if free < need_disk:
        raise BadInput(
            f"{free >> 20} MiB free in {cache}, {need_disk >> 20} MiB needed (image and "
            "overlays); free some space or pass --cache DIR on a larger disk"
        )
    for tool in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4", "ip"):
        if shutil.which(tool) is None:
            raise BadInput(
                f"{tool} is missing; run the lab through deploy/vmlab.sh, which "
                "installs qemu-system-x86, qemu-utils, mmdebstrap and e2fsprogs"
            )


def render(
    report: Report, nodes: list[str], backend: str, accel: str, times: dict[str, str]
) -> tuple[str, bool]:
    rows = [["check", *nodes]]
    for check in CHECKS:
        cells = []
        for node in nodes:
            outcome = report.results.get(check, {}).get(node)
            cells.append("-" if outcome is None else "ok" if outcome.ok else "FAIL")
        rows.append([check, *cells])
    lines = [f"flanneld-py VM lab: {len(nodes)} VMs, backend {backend}, accelerator {accel}", ""]
    lines += table_lines(rows)
    lines.append("")
    for check in CHECKS:
        for node in nodes:
            outcome = report.results.get(check, {}).get(node)
            if outcome is not None:
                mark = "ok  " if outcome.ok else "FAIL"
                lines.append(f"  {mark} {node} {check}: {outcome.detail}")
    lines.append("")
    lines.append("  times: " + ", ".join(f"{k} {v}" for k, v in times.items()))
    ok = report.passed(nodes)
    failed = sum(
        1
        for c in CHECKS
        for n in nodes
        if not (report.results.get(c, {}).get(n) and report.results[c][n].ok)
    )
    verdict = (
        f"all {len(CHECKS)} checks passed on {len(nodes)} VMs"
        if ok
        else f"{failed} of {len(CHECKS) * len(nodes)} checks FAILED or not run"
    )
    lines.append(f"  {verdict}")
    return "\n".join(lines), ok


def run_lab(args: argparse.Namespace, say: Progress) -> int:
    cache = Path(args.cache)
    preflight(args.nodes, cache)
    accel = choose_accel(args.accel, say)
    slow = TCG_SLOWDOWN if accel == "tcg" else 1.0
    times: dict[str, str] = {}

    img = images.ensure_image(cache, say)
    times["image"] = f"{'built' if img.built else 'cached'} {img.seconds:.0f} s"
    say(
        f"image {img.dir.name}: {images.file_mib(img.rootfs)} MiB "
        f"({'built' if img.built else 'from the cache'} in {img.seconds:.0f} s)"
    )
    wheels = images.ensure_wheels(cache, say)

    for stale in stale_runs(cache):
        say(f"removing what a killed lab left: {', '.join(teardown(stale, cache))}")
    prefix = args.prefix or "vl" + secrets.token_hex(3)
    if prefix in kept_runs(cache):
        raise BadInput(f"a lab {prefix} is up; remove it with --down --prefix {prefix}")
    machines = Machines(prefix, cache, args.nodes, accel)
    report = Report()

    def step(check: str) -> None:
        cells = report.results.get(check, {})
        say(f"{check}: " + ", ".join(f"{n} {'ok' if o.ok else 'FAIL'}" for n, o in cells.items()))

    try:
        machines.create_network()
        say(
            f"lab {prefix}: namespace {machines.ns}, bridge br0, taps "
            f"{', '.join(f'tap{vm.index}' for vm in machines.vms)}"
        )
        t_boot = time.monotonic()
        for vm in machines.vms:
            machines.boot(vm, img, {"repo": ROOT, "wheels": wheels})
        for vm in machines.vms:
            try:
                vm.agent.wait_boot(180 * slow)
            except VMError as e:
                hint = "; try --accel tcg" if accel == "kvm" else ""
                raise VMError(f"{e}{hint}; console:\n{vm.console_tail()}") from None
        times["boot"] = f"{time.monotonic() - t_boot:.0f} s"
        say(
            f"{args.nodes} VMs booted ({accel}) in {time.monotonic() - t_boot:.0f} s: "
            + ", ".join(f"{vm.name} {vm.ip}" for vm in machines.vms)
        )

        sc = Scenario(machines.vms, args.backend, say, slow)
        sc.report = report
        t = time.monotonic()
        sc.each(sc.provision)  # all at once, as `vagrant up` with libvirt does
        times["provision"] = f"{time.monotonic() - t:.0f} s"
        say(
            "provisioned: deploy/vagrant-provision.sh -> deploy/install.sh, "
            "systemctl enable + restart flanneld"
        )
        for vm in machines.vms:
            sc.check_active(vm)
            sc.check_notify(vm)
            sc.subnets[vm.name] = env_of(vm)["FLANNEL_SUBNET"]
        step("flanneld active")
        step("active only after subnet.env")
        say("subnets: " + ", ".join(f"{n} {s}" for n, s in sc.subnets.items()))

        sc.each(sc.docker)
        for vm in machines.vms:
            sc.check_docker(vm)
        step("docker0 on FLANNEL_SUBNET, MTU")
        for vm in machines.vms:
            sc.check_pings(vm)
        step("container pings every other VM")
        for vm in machines.vms:
            sc.check_hardening(vm)
        step("hardening in force, nothing denied")
        sc.restart_stream()
        step("restart: same subnet, stream")
        for vm in machines.vms:
            sc.stop_start(vm)
        step("stop, start: same subnet")
        t = time.monotonic()
        sc.reboot_all()
        times["reboot"] = f"{time.monotonic() - t:.0f} s"
        step("reboot brings it all back")
        for vm in machines.vms:  # after the reboots the boot-time start counts
            sc.check_hardening(vm)
        step("hardening in force, nothing denied")
    except (VMError, OSError, subprocess.SubprocessError) as e:
        say(f"stopped: {e}")
    finally:
        times["total"] = f"{say.elapsed():.0f} s"
        if args.keep:
            say(
                f"kept: namespace {machines.ns}, run dir {machines.run_dir}; "
                f"`deploy/vmlab.sh --exec node1 CMD --prefix {prefix}` runs a command, "
                f"`deploy/vmlab.sh --down --prefix {prefix}` removes it all"
            )
        else:
            say(f"tearing down {prefix}")
        machines.close(args.keep)
    text, ok = render(report, [vm.name for vm in machines.vms], args.backend, accel, times)
    print(text, flush=True)
    return 0 if ok else 1


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deploy/vmlab.sh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=2, help="VMs, 1 to 8 (default 2)")
    parser.add_argument("--backend", choices=BACKENDS, default="vxlan")
    parser.add_argument("--keep", action="store_true", help="leave the lab up")
    parser.add_argument(
        "--down",
        action="store_true",
        help="remove a lab left up by --keep (--prefix, default: all)",
    )
    parser.add_argument("--prefix", help="the lab's prefix (vl + 6 hex digits)")
    parser.add_argument(
        "--exec", nargs=2, metavar=("NODE", "CMD"), help="run CMD on NODE of a kept lab (--prefix)"
    )
    parser.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default="auto",
        help="auto: KVM where it can run Debian's kernel, else TCG emulation",
    )
    parser.add_argument(
        "--cache",
        default=os.environ.get("VMLAB_CACHE", str(images.DEFAULT_CACHE)),
        help=f"image, wheels and runs (default {images.DEFAULT_CACHE})",
    )
    args = parser.parse_args(argv)
    if args.prefix and not PREFIX_RE.fullmatch(args.prefix):
        parser.error(f"--prefix must be vl and 6 hex digits, not {args.prefix!r}")
    if not 1 <= args.nodes <= 8:
        parser.error("--nodes must be from 1 to 8")
    cache = Path(args.cache)
    if args.down:
        idle = [p for p in kept_runs(cache) if not running(cache, p)]  # not a lab still going
        for prefix in [args.prefix] if args.prefix else idle:
            print(f"{prefix}: removed {', '.join(teardown(prefix, cache)) or 'nothing'}")
        return 0
    if args.exec:
        if not args.prefix:
            parser.error("--exec needs --prefix")
        agent = GuestAgent(cache / "runs" / args.prefix / f"{args.exec[0]}.agent", args.exec[0])
        res = agent.run(args.exec[1], timeout=600)
        sys.stdout.write(res.out)
        sys.stderr.write(res.err)
        return res.rc
    say = Progress()
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return run_lab(args, say)
    except (BadInput, images.ImageError) as e:
        print(f"deploy/vmlab.sh: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deploy/vmlab.sh: interrupted; the lab was torn down", file=sys.stderr)
        return 130
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
