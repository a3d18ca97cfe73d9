"""What people and tools meet: the `flanneld` and `flannelctl` commands and the metrics."""
