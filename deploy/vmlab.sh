#!/usr/bin/env bash
# The VM lab: N Debian 12 VMs (QEMU, direct kernel boot) with real systemd, etcd from Debian's
# etcd-server on node1, the agent installed in each by deploy/vagrant-provision.sh and
# deploy/install.sh as the Vagrantfile does, Docker on the flannel subnet; a table of checks.
# Run as root; installs what is missing (QEMU, mmdebstrap, a .venv with the agent).
#
#   sudo deploy/vmlab.sh [--nodes N] [--backend host-gw|vxlan|udp] [--keep] [--accel auto|kvm|tcg]
#   sudo deploy/vmlab.sh --exec node1 'systemctl status flanneld' --prefix PREFIX   (a kept lab)
#   sudo deploy/vmlab.sh --down [--prefix PREFIX]        (remove labs left up by --keep)
#
# The image is built once (about 2 minutes, Debian's packages only) and cached under
# /var/cache/flanneld-vmlab (or --cache DIR / VMLAB_CACHE); a changed recipe builds a new one.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/setup-env.sh
need_root deploy/vmlab.sh
need_debian_packages python3:python3 ip:iproute2 qemu-system-x86_64:qemu-system-x86 \
  qemu-img:qemu-utils mmdebstrap:mmdebstrap mkfs.ext4:e2fsprogs
[ -e /usr/share/seabios/bios-256k.bin ] || need_debian_packages seabios-is-missing:seabios
setup_venv -e .
exec .venv/bin/python -m deploy.vmlab "$@"
