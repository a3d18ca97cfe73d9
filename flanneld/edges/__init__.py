"""The I/O edges, thin and tested against the real thing: the etcd registry, the host's links,
the health and status listeners, sd_notify, subnet.env, the firewall commands."""
