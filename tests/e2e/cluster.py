"""The e2e tests' common ground: `deploy.cluster` (the agent on every lab node) plus the
assertions and the root check the tests share."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from deploy import cluster
from deploy.cluster import PREFIX, wait_until
from deploy.lab import Lab

__all__ = ["PREFIX", "Cluster", "need_lab", "running", "wait_until"]


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


@contextlib.contextmanager
def running(
    config: dict, args: tuple[str, ...] = (), nodes: int = 3, start: int | None = None, **lab_kw
) -> Iterator[Cluster]:
    """A lab with etcd, `config` written, and the agent ready on its first `start` nodes (all
    by default), containers attached: the module fixture of most e2e files."""
    need_lab()
    with Lab(nodes=nodes, **lab_kw) as lab:
        lab.start_etcd()
        c = Cluster(lab, config, args)
        for node in lab.nodes[:start]:
            c.start(node)
        for node in lab.nodes[:start]:
            c.wait_ready(node)
        yield c
