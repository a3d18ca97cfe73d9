"""TLS client certificates and user/password auth against real etcd servers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flanneld.edges.registry import EtcdConfigError, EtcdRegistry, EtcdUnavailable, TLSFiles

from ..conftest import EtcdServer


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


def make_ca(d: Path, name: str) -> None:
    openssl(
        "req",
        "-x509",
        *NEW_KEY,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )


def make_cert(d: Path, ca: str, name: str, san: str = "") -> None:
    openssl(
        "req",
        *NEW_KEY,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )
    ext = d / f"{name}.ext"
    ext.write_text(
        f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n"
        if san
        else "extendedKeyUsage=clientAuth\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-extfile",
        ext.name,
        cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_cert(d, "ca", "server", "IP:127.0.0.1")
    make_cert(d, "ca", "client")
    make_cert(d, "rogue-ca", "rogue")
    return d


@pytest.fixture(scope="module")
def tls_etcd(pki):
    server = EtcdServer(
        (
            "--client-cert-auth",
            f"--trusted-ca-file={pki}/ca.crt",
            f"--cert-file={pki}/server.crt",
            f"--key-file={pki}/server.key",
        ),
        scheme="https",
    )
    server.ctl_args = [
        f"--cacert={pki}/ca.crt",
        f"--cert={pki}/client.crt",
        f"--key={pki}/client.key",
    ]
    server.start()
    yield server
    server.stop()


async def test_tls_client_certificate_works(tls_etcd, pki):
    reg = EtcdRegistry(
        [tls_etcd.endpoint],
        "/tls/network",
        TLSFiles(f"{pki}/ca.crt", f"{pki}/client.crt", f"{pki}/client.key"),
    )
    try:
        await reg.put_config(b'{"Network":"10.9.0.0/16"}')
        assert await reg.get_config() == b'{"Network":"10.9.0.0/16"}'
    finally:
        await reg.close()
    assert tls_etcd.etcdctl("get", "--print-value-only", "/tls/network/config").strip()


@pytest.mark.parametrize("cert", ["rogue", None])
async def test_wrong_or_missing_client_certificate_is_one_clear_error(tls_etcd, pki, cert):
    files = (
        TLSFiles(f"{pki}/ca.crt", f"{pki}/{cert}.crt", f"{pki}/{cert}.key")
        if cert
        else TLSFiles(f"{pki}/ca.crt")
    )
    reg = EtcdRegistry([tls_etcd.endpoint], "/tls/network", files)
    try:
        with pytest.raises((EtcdUnavailable, EtcdConfigError)) as exc:
            await reg.get_config()
    finally:
        await reg.close()
    msg = str(exc.value)
    assert "\n" not in msg and "certificate" in msg.lower(), msg


@pytest.fixture(scope="module")
def auth_etcd():
    server = EtcdServer()
    server.start()
    ctl = server.etcdctl
    ctl("user", "add", "root:rootpw")
    ctl("role", "add", "flannel")
    ctl("role", "grant-permission", "flannel", "--prefix=true", "readwrite", "/auth/network/")
    ctl("user", "add", "flannel:flannelpw")
    ctl("user", "grant-role", "flannel", "flannel")
    ctl("user", "add", "nobody:nobodypw")
    ctl("auth", "enable")
    server.ctl_args = ["--user=root:rootpw"]
    yield server
    server.stop()


async def test_rbac_user_works_on_its_prefix(auth_etcd):
    reg = EtcdRegistry(
        [auth_etcd.endpoint], "/auth/network", username="flannel", password="flannelpw"
    )
    try:
        await reg.put_config(b'{"Network":"10.9.0.0/16"}')
        assert await reg.get_config() == b'{"Network":"10.9.0.0/16"}'
        snap = await reg.snapshot()
        assert snap.leases == {}
    finally:
        await reg.close()


@pytest.mark.parametrize(
    "user, password, words",
    [("flannel", "wrong", "--etcd-password"), ("nobody", "nobodypw", "permission")],
)
async def test_wrong_password_or_missing_permission_is_one_clear_error(
    auth_etcd, user, password, words
):
    reg = EtcdRegistry([auth_etcd.endpoint], "/auth/network", username=user, password=password)
    try:
        with pytest.raises(EtcdConfigError) as exc:
            await reg.get_config()
    finally:
        await reg.close()
    assert words in str(exc.value) and "\n" not in str(exc.value)
