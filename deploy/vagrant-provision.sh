#!/usr/bin/env bash
# Provision one VM of the Vagrant lab (see Vagrantfile), as root inside the VM: etcd on the
# node whose address is ETCD_IP, with the network config for BACKEND; on every node the agent
# from the synced folder as the systemd service, pinned to the private NIC (NODE_IP). Safe to
# run again (`vagrant provision`): it reinstalls the agent and restarts it. Packages already
# installed are not fetched again; WHEELS=DIR installs the agent offline (install.sh --wheels),
# as deploy/vmlab.sh does in its VMs, which run this script.
set -euo pipefail
: "${NODE_IP:?}" "${ETCD_IP:?}" "${BACKEND:?}" "${FLANNEL_NETWORK:?}"
export DEBIAN_FRONTEND=noninteractive
src=/vagrant

packages=(python3 python3-venv iproute2)
[ "$NODE_IP" != "$ETCD_IP" ] || packages+=(etcd-server etcd-client)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' ||
    missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ "$NODE_IP" = "$ETCD_IP" ]; then
  cat >/etc/default/etcd <<CONF
ETCD_LISTEN_CLIENT_URLS=http://127.0.0.1:2379,http://$NODE_IP:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$NODE_IP:2379
CONF
  systemctl enable -q etcd # back after a reboot, also where the package came disabled
  systemctl restart etcd
  for _ in $(seq 60); do
    etcdctl --endpoints=http://127.0.0.1:2379 endpoint health >/dev/null 2>&1 && break
    sleep 1
  done
  config="{\"Network\": \"$FLANNEL_NETWORK\", \"Backend\": {\"Type\": \"$BACKEND\"}}"
  etcdctl --endpoints=http://127.0.0.1:2379 put /coreos.com/network/config "$config"
  echo "etcd on $NODE_IP: /coreos.com/network/config = $config"
fi

bash "$src/deploy/install.sh" ${WHEELS:+--wheels "$WHEELS"}
cat >/etc/default/flanneld <<CONF
# written by deploy/vagrant-provision.sh
FLANNELD_ETCD_ENDPOINTS=http://$ETCD_IP:2379
FLANNELD_IFACE=$NODE_IP
CONF
chmod 0600 /etc/default/flanneld

# Containers' traffic is forwarded between cni0 (or docker0) and the overlay.
echo net.ipv4.ip_forward=1 >/etc/sysctl.d/90-flanneld.conf
sysctl -q -w net.ipv4.ip_forward=1

systemctl enable -q flanneld
systemctl restart --no-block flanneld
for _ in $(seq 120); do # "active" once the agent sent READY=1, after writing subnet.env
  systemctl is-active -q flanneld && break
  sleep 1
done
if ! systemctl is-active -q flanneld; then
  echo "flanneld did not become ready within 120 s:" >&2
  journalctl -u flanneld --no-pager -n 20 >&2
  exit 1
fi
# shellcheck source=/dev/null
. /run/flannel/subnet.env
# A cni0 bridge with the node's gateway address (what the CNI plugin would create), so the
# nodes can ping each other's 10.244.x.1 across the overlay; with Docker, drop it
# (ip link del cni0) and start dockerd with mk-docker-opts' options instead.
ip link show cni0 >/dev/null 2>&1 || ip link add cni0 type bridge
ip addr flush dev cni0
ip addr add "$FLANNEL_SUBNET" dev cni0
ip link set cni0 up
echo "$(hostname): flanneld ready, subnet $FLANNEL_SUBNET, MTU $FLANNEL_MTU, backend $BACKEND"
