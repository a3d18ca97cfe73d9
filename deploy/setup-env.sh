# shellcheck shell=bash
# Install steps shared by deploy/run-tests.sh and deploy/demo.sh; source it from the repo root.
# Each step installs only what is missing, so a second run costs a second or two.

# need_root SCRIPT: stop with one line unless run as root (the lab creates network namespaces).
need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "$1: run as root (sudo $1 ...): the lab creates network namespaces" >&2
    exit 1
  fi
}

# need_debian_packages COMMAND:PACKAGE...: apt-get install the packages whose command is missing.
need_debian_packages() {
  local missing=() spec
  for spec in "$@"; do
    command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
  done
  if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

# setup_venv PIP-ARGS...: a virtualenv .venv with PIP-ARGS installed; pip runs again only when
# the arguments or pyproject.toml changed since the last successful install.
setup_venv() {
  local want stamp
  want="$(sha256sum pyproject.toml | cut -d' ' -f1) $*"
  stamp=".venv/.installed-$(echo "$*" | sha256sum | cut -c1-12)"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing into .venv: $*"
    .venv/bin/pip install -q --disable-pip-version-check "$@"
    echo "$want" >"$stamp"
  fi
}
