"""The VM lab's disk image and wheels, built once from Debian's and PyPI's packages and kept in
a cache directory, keyed by a hash of their recipe (a changed recipe builds a new one).

The image: Debian 12 (bookworm) made by mmdebstrap with systemd, the kernel, Docker, etcd,
busybox, Python and the lab's guest agent, as a sparse raw ext4 file; the kernel and initrd
beside it for direct kernel boot. VMs boot copy-on-write overlays of it, so it is never
changed. The wheels: the agent's dependencies (and setuptools to build it), for Debian 12's
Python 3.11, so deploy/install.sh installs the agent inside a VM with no network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path("/var/cache/flanneld-vmlab")
SUITE = "bookworm"
IMAGE_SIZE = "6G"  # sparse: the file takes what the root filesystem uses (about 1.3 GB)
BUILD_TIMEOUT = 1500.0  # seconds for mmdebstrap (downloads and installs about 300 MB)
PACKAGES = (
    "systemd-sysv",
    "udev",
    "kmod",
    "dbus",
    "linux-image-amd64",
    "initramfs-tools",
    "iproute2",
    "iputils-ping",
    "procps",
    "iptables",
    "apparmor",  # Debian's kernel enables AppArmor: Docker needs its parser
    "python3",
    "python3-venv",
    "rsync",
    "docker.io",
    "etcd-server",
    "etcd-client",
    "busybox-static",
)
# Python tags of Debian 12's python3 (3.11, glibc 2.36): the wheels must suit it, whatever
# Python builds them.
WHEEL_TAGS = (
    ["--implementation", "cp", "--python-version", "3.11", "--abi", "cp311"]
    + [f"--platform=manylinux_2_{minor}_x86_64" for minor in range(5, 37)]
    + ["--platform=manylinux2014_x86_64", "--platform=manylinux2010_x86_64"]
    + ["--platform=manylinux1_x86_64"]
)
BUILD_REQUIREMENTS = ("setuptools>=68", "wheel")

# Run on the host with the root directory as $1, after mmdebstrap.
CUSTOMIZE = r"""
set -eu
r=$1
# root on the virtio disk, the repository and the wheels on 9p shares (read-only); the
# repository is copied to /vagrant as Vagrant's rsync synced folder would
cat >"$r/etc/fstab" <<'EOF'
/dev/vda  /                 ext4  rw,errors=remount-ro                   0 1
repo      /mnt/vmlab-repo   9p    trans=virtio,version=9p2000.L,ro,nofail,msize=262144 0 0
wheels    /mnt/vmlab-wheels 9p    trans=virtio,version=9p2000.L,ro,nofail,msize=262144 0 0
EOF
mkdir -p "$r/mnt/vmlab-repo" "$r/mnt/vmlab-wheels" "$r/vagrant" "$r/usr/local/share/vmlab"
# a fixed machine id (not a "first boot", so no unit presets run); each VM gets its own
# with systemd.machine_id= on the kernel command line
echo 8d1c4b0a5e7f4c3a9b2d6e1f0a3c5b7d >"$r/etc/machine-id"
echo vmlab >"$r/etc/hostname"

# the underlay NIC eth0 from the kernel command line: vmlab.ip=192.0.2.11/24
cat >"$r/usr/local/sbin/vmlab-net" <<'EOF'
#!/bin/sh
set -eu
addr=
for arg in $(cat /proc/cmdline); do
  case $arg in vmlab.ip=*) addr=${arg#vmlab.ip=} ;; esac
done
[ -n "$addr" ] || exit 0
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
ip link set lo up
ip link set eth0 up
ip addr replace "$addr" dev eth0
EOF
chmod 0755 "$r/usr/local/sbin/vmlab-net"
cat >"$r/etc/systemd/system/vmlab-net.service" <<'EOF'
[Unit]
Description=VM lab underlay address (vmlab.ip= on the kernel command line)
DefaultDependencies=no
After=systemd-udevd.service
Wants=network.target
Before=network.target network-online.target shutdown.target
Conflicts=shutdown.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/vmlab-net
[Install]
WantedBy=network-online.target multi-user.target
EOF

# the guest agent on the virtio-serial port vmlab.agent
install -m 0755 /dev/stdin "$r/usr/local/sbin/vmlab-agent" <"$GUEST_AGENT"
sed -i '1i #!/usr/bin/python3' "$r/usr/local/sbin/vmlab-agent"
cat >"$r/etc/systemd/system/vmlab-agent.service" <<'EOF'
[Unit]
Description=VM lab guest agent (commands from the host on virtio-serial)
DefaultDependencies=no
After=local-fs.target systemd-udevd.service
Before=shutdown.target
Conflicts=shutdown.target
[Service]
ExecStart=/usr/local/sbin/vmlab-agent
Restart=always
RestartSec=1
[Install]
WantedBy=sysinit.target
EOF

# a console login on ttyS0 without a password (the lab's console socket, for --keep)
mkdir -p "$r/etc/systemd/system/serial-getty@ttyS0.service.d"
cat >"$r/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
EOF

# a tiny container image for `docker import`: busybox and its applets
bb=$(mktemp -d)
mkdir -p "$bb/bin" "$bb/etc" "$bb/tmp"
cp "$r/bin/busybox" "$bb/bin/busybox"
for applet in $(chroot "$r" /bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$bb/bin/$applet"
done
echo 'root:x:0:0:root:/:/bin/sh' >"$bb/etc/passwd"
tar -C "$bb" -cf "$r/usr/local/share/vmlab/busybox.tar" .
rm -rf "$bb"

# Docker, containerd and etcd start only when the lab (or the provisioning) says so, as on a
# box where they were never configured; the rest is boot time the lab does not need
chroot "$r" systemctl enable -q vmlab-net.service vmlab-agent.service
chroot "$r" systemctl disable -q docker.service docker.socket containerd.service etcd.service
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
  e2scrub_reap.service; do
  chroot "$r" systemctl mask -q "$unit" 2>/dev/null || true
done
rm -rf "$r/var/cache/apt/archives/"*.deb "$r/var/lib/apt/lists/"*_Packages
"""


class ImageError(RuntimeError):
    """The image or the wheels could not be built; the message names the cause and the fix."""


@dataclass(frozen=True)
class Image:
    dir: Path
    rootfs: Path  # raw ext4, the VMs' backing file
    kernel: Path
    initrd: Path
    built: bool  # built by this run (False: found in the cache)
    seconds: float


def apt_sources() -> list[str]:
    """The host's Debian archive URIs for bookworm as one-line sources, so the image comes
    from the same mirror; Debian's own when the host has none (a proxy the host's apt uses
    is passed on by `apt_options`)."""
    try:
        out = subprocess.run(
            [
                "apt-get",
                "indextargets",
                "--format",
                "$(REPO_URI) $(RELEASE)",
                "Identifier: Packages",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    suites = {f"{SUITE}", f"{SUITE}-updates", f"{SUITE}-security"}
    lines = sorted(
        {
            f"deb {uri} {rel} main"
            for uri, rel in (ln.split()[:2] for ln in out.splitlines() if ln)
            if rel in suites
        }
    )
    if not any(f" {SUITE} " in line for line in lines):
        lines = [
            f"deb http://deb.debian.org/debian {SUITE} main",
            f"deb http://deb.debian.org/debian {SUITE}-updates main",
            f"deb http://deb.debian.org/debian-security {SUITE}-security main",
        ]
    return lines


def apt_options() -> list[str]:
    """The host apt's proxy settings, for mmdebstrap's apt."""
    try:
        out = subprocess.run(
            ["apt-config", "dump"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [
        line.rstrip(";")
        for line in out.splitlines()
        if line.lower().startswith(("acquire::http::proxy", "acquire::https::proxy"))
    ]


def recipe() -> dict[str, object]:
    """Everything the image is made from; its hash names the cached image."""
    return {
        "suite": SUITE,
        "packages": list(PACKAGES),
        "sources": apt_sources(),
        "apt_options": apt_options(),
        "size": IMAGE_SIZE,
        "customize": CUSTOMIZE,
        "guest_agent": (Path(__file__).parent / "guest_agent.py").read_text(),
    }


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """One build at a time per cache directory (another lab waits for it)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(cmd: list[str], log: Path, timeout: float, what: str, fix: str) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            res = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise ImageError(f"{what} took over {timeout:.0f} s (log: {log}); {fix}") from None
    if res.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").splitlines()[-3:])
        raise ImageError(f"{what} failed ({tail}; log: {log}); {fix}")


def ensure_image(cache: Path, say: Callable[[str], None]) -> Image:
    """The cached image for the current recipe, built first if missing."""
    rec = recipe()
    key = digest(rec)
    final = cache / f"image-{key}"
    t0 = time.monotonic()
    with locked(cache):
        if (final / "recipe.json").exists():
            return _image(final, built=False, seconds=time.monotonic() - t0)
        say(f"building the Debian {SUITE} image {final.name} (once; a few minutes)")
        _need_free(cache, 5 << 30, "to build the image")
        work = cache / f"image-{key}.building"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        log = work / "build.log"
        rootdir = work / "root"
        fix = "check the network to the Debian mirror (apt-get update works?) and run again"
        try:
            cmd = [
                "mmdebstrap",
                "--mode=root",
                "--variant=apt",
                "--format=directory",
                "--include=" + ",".join(PACKAGES),
                *(f"--aptopt={opt}" for opt in rec["apt_options"]),  # type: ignore[union-attr]
                SUITE,
                str(rootdir),
                *rec["sources"],  # type: ignore[misc]
            ]
            _run(cmd, log, BUILD_TIMEOUT, "the image build (mmdebstrap)", fix)
            script = work / "customize.sh"
            script.write_text(CUSTOMIZE)
            env_cmd = [
                "env",
                f"GUEST_AGENT={Path(__file__).parent / 'guest_agent.py'}",
                "sh",
                str(script),
                str(rootdir),
            ]
            _run(env_cmd, log, 300, "customizing the image", "see the log")
            for name in ("vmlinuz", "initrd.img"):
                shutil.copyfile((rootdir / name).resolve(), work / name)
            mkfs = ["mkfs.ext4", "-q", "-F", "-L", "vmlab", "-d", str(rootdir)]
            _run([*mkfs, str(work / "rootfs.raw"), IMAGE_SIZE], log, 600, "mkfs.ext4 -d", fix)
            shutil.rmtree(rootdir)
            (work / "recipe.json").write_text(json.dumps(rec, indent=1))
            work.rename(final)
        except BaseException:
            shutil.rmtree(rootdir, ignore_errors=True)
            raise
        for old in cache.glob("image-*"):  # earlier recipes' images and failed builds
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return _image(final, built=True, seconds=time.monotonic() - t0)


def _image(d: Path, built: bool, seconds: float) -> Image:
    return Image(d, d / "rootfs.raw", d / "vmlinuz", d / "initrd.img", built, seconds)


def _need_free(path: Path, need: int, why: str) -> None:
    free = shutil.disk_usage(path).free
    if free < need:
        raise ImageError(
            f"only {free >> 20} MiB free in {path}, {need >> 20} MiB needed {why}; "
            f"free some space or give another --cache directory"
        )


def ensure_wheels(cache: Path, say: Callable[[str], None]) -> Path:
    """A directory of wheels with the agent's dependencies and its build requirements."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*BUILD_REQUIREMENTS, *project["dependencies"]]
    d = cache / f"wheels-{digest([wanted, WHEEL_TAGS])}"
    with locked(cache):
        if (d / ".complete").exists():
            return d
        say(f"downloading the agent's wheels from PyPI into {d.name} (once)")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        log = cache / "wheels.log"
        log.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
        cmd += ["--only-binary=:all:", *WHEEL_TAGS, "-d", str(d), *wanted]
        try:
            _run(cmd, log, 600, "downloading the wheels", "check the network to PyPI")
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        (d / ".complete").touch()
        for old in cache.glob("wheels-*"):
            if old != d:
                shutil.rmtree(old, ignore_errors=True)
        return d


def image_cached(cache: Path) -> bool:
    return (cache / f"image-{digest(recipe())}" / "recipe.json").exists()


def file_mib(path: Path) -> int:
    """MiB a sparse file really takes."""
    return os.stat(path).st_blocks * 512 >> 20
