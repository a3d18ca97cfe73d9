#!/usr/bin/env bash
# Turn flannel's subnet.env into Docker daemon options, as flannel's dist/mk-docker-opts.sh
# does (same flags, same output), for a docker.service drop-in to read with EnvironmentFile=.
#
#   FLANNEL_SUBNET=10.1.74.1/24   ->  DOCKER_OPT_BIP="--bip=10.1.74.1/24"
#   FLANNEL_MTU=1450              ->  DOCKER_OPT_MTU="--mtu=1450"
#   FLANNEL_IPMASQ=true           ->  DOCKER_OPT_IPMASQ="--ip-masq=false" (flannel masquerades,
#   FLANNEL_IPMASQ=false          ->  DOCKER_OPT_IPMASQ="--ip-masq=true"   so Docker must not)
#   and all of them in DOCKER_OPTS (after any DOCKER_OPTS already in the environment).
set -euo pipefail

usage() {
  cat >&2 <<EOF
usage: $0 [-f FLANNEL-ENV-FILE] [-d DOCKER-ENV-FILE] [-i] [-c] [-m] [-k COMBINED-KEY]

Generate Docker daemon options based on flannel env file
OPTIONS:
	-f	Path to flannel env file. Defaults to /run/flannel/subnet.env
	-d	Path to Docker env file to write to. Defaults to /run/docker_opts.env
	-i	Output each Docker option as individual var. e.g. DOCKER_OPT_MTU=1500
	-c	Output combined Docker options into DOCKER_OPTS var
	-k	Set the combined options key to this value (default DOCKER_OPTS=)
	-m	Do not output --ip-masq (useful for older Docker version)
EOF
  exit 1
}

flannel_env=/run/flannel/subnet.env
docker_env=/run/docker_opts.env
combined_opts_key=DOCKER_OPTS
indiv_opts=false
combined_opts=false
ipmasq=true

while getopts "f:d:icmk:h" opt; do
  case $opt in
    f) flannel_env=$OPTARG ;;
    d) docker_env=$OPTARG ;;
    i) indiv_opts=true ;;
    c) combined_opts=true ;;
    m) ipmasq=false ;;
    k) combined_opts_key=$OPTARG ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || usage

if ! [[ $combined_opts_key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
  echo "$0: -k $combined_opts_key is not a valid variable name" >&2
  exit 1
fi
if [ $indiv_opts = false ] && [ $combined_opts = false ]; then
  indiv_opts=true
  combined_opts=true
fi

# Read the file as data (KEY=VALUE lines), never execute it.
FLANNEL_SUBNET="" FLANNEL_MTU="" FLANNEL_IPMASQ=""
if [ -f "$flannel_env" ]; then
  while IFS='=' read -r key value; do
    value=${value%$'\r'}
    value=${value#\"}
    value=${value%\"}
    case $key in
      FLANNEL_SUBNET) FLANNEL_SUBNET=$value ;;
      FLANNEL_MTU) FLANNEL_MTU=$value ;;
      FLANNEL_IPMASQ) FLANNEL_IPMASQ=$value ;;
    esac
  done <"$flannel_env"
fi

# name=value pairs in the reference's order (its loop walks the variables sorted by name)
opts=()
[ -z "$FLANNEL_SUBNET" ] || opts+=("DOCKER_OPT_BIP=--bip=$FLANNEL_SUBNET")
if [ -n "$FLANNEL_IPMASQ" ] && [ $ipmasq = true ]; then
  case $FLANNEL_IPMASQ in
    true) opts+=("DOCKER_OPT_IPMASQ=--ip-masq=false") ;;
    false) opts+=("DOCKER_OPT_IPMASQ=--ip-masq=true") ;;
    *)
      echo "Invalid value of FLANNEL_IPMASQ: $FLANNEL_IPMASQ" >&2
      exit 1
      ;;
  esac
fi
[ -z "$FLANNEL_MTU" ] || opts+=("DOCKER_OPT_MTU=--mtu=$FLANNEL_MTU")

docker_opts=${!combined_opts_key:-}
[ -z "$docker_opts" ] || docker_opts+=" "
{
  for pair in "${opts[@]}"; do
    if [ $indiv_opts = true ]; then
      echo "${pair%%=*}=\"${pair#*=}\""
    fi
    docker_opts+=" ${pair#*=}"
  done
  if [ $combined_opts = true ]; then
    echo "${combined_opts_key}=\"${docker_opts}\""
  fi
} >"$docker_env"

# Like the reference: refuse when this node's subnet is already routed via another host
# (a stale host-gw route would steal the containers' traffic).
if [ -n "$FLANNEL_SUBNET" ] && command -v ip >/dev/null 2>&1; then
  network=$(
    IFS=./ read -r a b c d len <<<"$FLANNEL_SUBNET"
    echo "$a.$b.$c.$((d - 1))/$len"
  )
  route=$(ip route show exact "$network" 2>/dev/null | grep ' via ' || true)
  if [ -n "$route" ]; then
    echo "Your routing table already contains the subnet: $route" >&2
    exit 1
  fi
fi
