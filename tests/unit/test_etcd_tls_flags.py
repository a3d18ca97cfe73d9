"""The etcd TLS flags checked when the registry is built: no server, no certificate parsed
(moved from tests/integration/test_etcd_security.py: they need no etcd)."""

from __future__ import annotations

import pytest

from flanneld.edges.registry import EtcdConfigError, EtcdRegistry, TLSFiles


def test_unreadable_tls_file_names_the_flag(tmp_path):
    # the CA and the certificate exist (read before the key); the key file does not
    for name in ("ca.crt", "client.crt"):
        (tmp_path / name).write_text("not parsed before every file was read\n")
    with pytest.raises(EtcdConfigError, match="--etcd-keyfile: cannot read /nonexistent"):
        EtcdRegistry(
            ["https://127.0.0.1:1"],
            "/x",
            TLSFiles(f"{tmp_path}/ca.crt", f"{tmp_path}/client.crt", "/nonexistent"),
        )


def test_cert_without_key_is_refused():
    with pytest.raises(EtcdConfigError, match="together"):
        EtcdRegistry(["https://127.0.0.1:1"], "/x", TLSFiles("", "/a.crt", ""))
