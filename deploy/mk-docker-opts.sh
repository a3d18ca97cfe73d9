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

# Read the file as data (KEY=VALUE lines, a last line without a newline too), never execute
# it; a value may be in one pair of double or single quotes.
FLANNEL_NETWORK="" FLANNEL_SUBNET="" FLANNEL_MTU="" FLANNEL_IPMASQ=""
if [ -f "$flannel_env" ]; then
  while IFS='=' read -r key value || [ -n "$key" ]; do
    value=${value%$'\r'}
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
      value=${BASH_REMATCH[1]}
    fi
    case $key in
      FLANNEL_NETWORK) FLANNEL_NETWORK=$value ;;
      FLANNEL_SUBNET) FLANNEL_SUBNET=$value ;;
      FLANNEL_MTU) FLANNEL_MTU=$value ;;
      FLANNEL_IPMASQ) FLANNEL_IPMASQ=$value ;;
    esac
  done <"$flannel_env"
fi

# Every field is checked in full before it is used or anything is written: the values end up in
# an env file that shells and systemd read, and the subnet's last octet in shell arithmetic.
octet='(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])' # no leading zero: 010 would be octal
cidr="^$octet\\.$octet\\.$octet\\.$octet/(3[0-2]|[12]?[0-9])\$"
refuse() { # field, its value, what is wrong with it
  printf '%s: %s=%q in %s %s; fix the file (flanneld writes it when it starts) and run again\n' \
    "$0" "$1" "$2" "$flannel_env" "$3" >&2
  exit 1
}
not_cidr="is not an IPv4 address and prefix length like 10.244.3.1/24"
[ -z "$FLANNEL_NETWORK" ] || [[ $FLANNEL_NETWORK =~ $cidr ]] ||
  refuse FLANNEL_NETWORK "$FLANNEL_NETWORK" "$not_cidr"
[ -z "$FLANNEL_SUBNET" ] || [[ $FLANNEL_SUBNET =~ $cidr ]] ||
  refuse FLANNEL_SUBNET "$FLANNEL_SUBNET" "$not_cidr"
if [ -n "$FLANNEL_MTU" ]; then
  # the pattern first: only then is the value known to be a plain decimal number
  if ! [[ $FLANNEL_MTU =~ ^[1-9][0-9]{1,4}$ ]] || [ "$FLANNEL_MTU" -lt 68 ] ||
    [ "$FLANNEL_MTU" -gt 65535 ]; then
    refuse FLANNEL_MTU "$FLANNEL_MTU" "is not a number from 68 to 65535"
  fi
fi
case $FLANNEL_IPMASQ in
  "" | true | false) ;;
  *) refuse FLANNEL_IPMASQ "$FLANNEL_IPMASQ" "is neither true nor false" ;;
esac

# name=value pairs in the reference's order (its loop walks the variables sorted by name)
opts=()
[ -z "$FLANNEL_SUBNET" ] || opts+=("DOCKER_OPT_BIP=--bip=$FLANNEL_SUBNET")
if [ -n "$FLANNEL_IPMASQ" ] && [ $ipmasq = true ]; then
  case $FLANNEL_IPMASQ in
    true) opts+=("DOCKER_OPT_IPMASQ=--ip-masq=false") ;;
    false) opts+=("DOCKER_OPT_IPMASQ=--ip-masq=true") ;;
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
    IFS=./ read -r a b c d len <<<"$FLANNEL_SUBNET" # digits only: checked above
    echo "$a.$b.$c.$((d - 1))/$len"
  )
  route=$(ip route show exact "$network" 2>/dev/null | grep ' via ' || true)
  if [ -n "$route" ]; then
    echo "Your routing table already contains the subnet: $route" >&2
    exit 1
  fi
fi
