"""flanneld: a flannel-compatible overlay network agent.

The agent leases a subnet of the cluster network from etcd, watches the other nodes' leases
and programs a backend (host-gw, vxlan, udp) so that containers on different nodes meet.
"""

__version__ = "0.1.0"
