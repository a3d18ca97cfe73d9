#!/usr/bin/env bash
# Install flanneld-py as a systemd service from this source tree:
#
#   /opt/flanneld/                       a virtualenv with the agent (pip install of this tree)
#   /usr/local/bin/flanneld              -> /opt/flanneld/bin/flanneld
#   /usr/local/bin/mk-docker-opts        subnet.env -> Docker daemon options
#   /etc/systemd/system/flanneld.service the unit
#   /etc/default/flanneld                the FLANNELD_* settings (from the sample; an existing
#                                        file is kept)
#
# Run again to upgrade. With --root DIR (or DESTDIR=DIR) everything goes below DIR instead of
# / and systemd is left alone: a staging tree for packaging or tests (the virtualenv works
# only once moved to /opt/flanneld). With --wheels DIR pip uses no index: the agent's
# dependencies and its build requirements (setuptools) come from the wheels in DIR (a machine
# with no network to PyPI, such as a VM of deploy/vmlab.sh). With --wireguard-go Debian's
# wireguard-go is installed too when missing: the wireguard backend drives it where the kernel
# has no WireGuard (a kernel with it, as Debian's, needs nothing more).
set -euo pipefail

usage() {
  echo "usage: $0 [--root DIR] [--python PYTHON] [--wheels DIR] [--wireguard-go]" >&2
  exit 2
}

src=$(cd "$(dirname "$0")/.." && pwd)
root=${DESTDIR:-}
python=python3
pip_source=()
wireguard_go=no
while [ $# -gt 0 ]; do
  case $1 in
    --root) [ $# -ge 2 ] || usage; root=$2; shift 2 ;;
    --root=*) root=${1#*=}; shift ;;
    --python) [ $# -ge 2 ] || usage; python=$2; shift 2 ;;
    --python=*) python=${1#*=}; shift ;;
    --wheels) [ $# -ge 2 ] || usage; pip_source=(--no-index --find-links "$2"); shift 2 ;;
    --wheels=*) pip_source=(--no-index --find-links "${1#*=}"); shift ;;
    --wireguard-go) wireguard_go=yes; shift ;;
    *) usage ;;
  esac
done
if [ -n "$root" ]; then
  mkdir -p "$root"
  root=$(cd "$root" && pwd)
  [ "$root" != / ] || root=""
fi
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
  echo "$0: installing into / needs root (or give --root DIR)" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "$0: $python is not Python 3.11 or newer; give one with --python" >&2
  exit 1
fi

if [ "$wireguard_go" = yes ] && ! command -v wireguard-go >/dev/null 2>&1; then
  if [ -n "$root" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "$0: --wireguard-go installs Debian's package into / only; install wireguard-go" \
      "yourself" >&2
    exit 1
  fi
  echo "installing Debian's wireguard-go (the wireguard backend's userspace device)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wireguard-go
fi

venv=/opt/flanneld
echo "installing the agent into $root$venv"
if [ ! -x "$root$venv/bin/python" ] && ! "$python" -m venv "$root$venv"; then
  echo "$0: cannot create a virtualenv; on Debian: apt-get install python3-venv" >&2
  exit 1
fi
"$root$venv/bin/pip" install -q --disable-pip-version-check "${pip_source[@]}" "$src"

install -d "$root/usr/local/bin" "$root/etc/systemd/system" "$root/etc/default"
ln -sfn "$venv/bin/flanneld" "$root/usr/local/bin/flanneld"
install -m 0755 "$src/deploy/mk-docker-opts.sh" "$root/usr/local/bin/mk-docker-opts"
install -m 0644 "$src/deploy/flanneld.service" "$root/etc/systemd/system/flanneld.service"
if [ -e "$root/etc/default/flanneld" ]; then
  echo "keeping $root/etc/default/flanneld (the sample is $src/deploy/flanneld.env.sample)"
else
  install -m 0600 "$src/deploy/flanneld.env.sample" "$root/etc/default/flanneld"
fi

if [ -z "$root" ] && [ -d /run/systemd/system ]; then # systemd is PID 1 (sd_booted)
  systemctl daemon-reload
fi
echo "installed; set FLANNELD_ETCD_ENDPOINTS and FLANNELD_IFACE in $root/etc/default/flanneld," \
  "then: systemctl enable --now flanneld"
