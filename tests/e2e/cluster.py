"""The e2e tests' common ground: `deploy.cluster` (the agent on every lab node) plus the
assertions and the root check the tests share."""

from __future__ import annotations

import os

import pytest

from deploy import cluster
from deploy.cluster import PREFIX, wait_until

__all__ = ["PREFIX", "Cluster", "need_lab", "wait_until"]


def need_lab() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to build the network-namespace lab")


class Cluster(cluster.Cluster):
    def assert_all_reachable(self, timeout: float = 10) -> None:
        matrix = self.wait_reachable(timeout)
        failed = [pair for pair, ok in matrix.items() if not ok]
        if failed:
            logs = "\n".join(f"--- {n.name}\n{self.log(n)[-1500:]}" for n in self.lab.nodes)
            raise AssertionError(f"unreachable: {failed}\n{logs}")
