import pytest

from flanneld.core.options import FlagError, parse_options
from flanneld.face.cli import main


def test_defaults_match_the_reference():
    o = parse_options([], {})
    assert o.etcd_endpoints == "http://127.0.0.1:4001,http://127.0.0.1:2379"
    assert o.etcd_prefix == "/coreos.com/network"
    assert o.subnet_file == "/run/flannel/subnet.env"
    assert o.subnet_lease_renew_margin == 60
    assert o.healthz_ip == "0.0.0.0" and o.healthz_port == 0
    assert o.ip_masq is False and o.iface == []
    assert o.state_dir == "/var/lib/flanneld"


def test_single_and_double_dash_and_equals():
    o = parse_options(["-etcd-prefix=/x", "--iface", "eth1", "-iface=10.0.0.1", "--ip-masq"], {})
    assert o.etcd_prefix == "/x"
    assert o.iface == ["eth1", "10.0.0.1"]
    assert o.ip_masq is True


def test_env_fills_unset_flags_and_cli_wins():
    env = {
        "FLANNELD_ETCD_PREFIX": "/from-env",
        "FLANNELD_HEALTHZ_PORT": "8471",
        "FLANNELD_IFACE": "eth1,eth2",  # one value, not split (as the reference)
        "FLANNELD_IP_MASQ": "true",
        "FLANNELD_STATE_DIR": "/tmp/st",
    }
    o = parse_options(["--healthz-port=9000"], env)
    assert o.etcd_prefix == "/from-env"
    assert o.healthz_port == 9000
    assert o.iface == ["eth1,eth2"]
    assert o.ip_masq is True
    assert o.state_dir == "/tmp/st"


def test_cli_false_beats_env_true():
    assert parse_options(["--ip-masq=false"], {"FLANNELD_IP_MASQ": "true"}).ip_masq is False


@pytest.mark.parametrize(
    "argv, env, words",
    [
        (["--subnet-lease-renew-margin=0"], {}, "1 and 1439"),
        (["--subnet-lease-renew-margin=1440"], {}, "1 and 1439"),
        (["--healthz-port=x"], {}, "--healthz-port"),
        ([], {"FLANNELD_HEALTHZ_PORT": "x"}, "--healthz-port"),
        (["--ip-masq=maybe"], {}, "--ip-masq"),
        (["--log-level=loud"], {}, "--log-level"),
        (["--reconcile-interval=nan"], {}, "--reconcile-interval"),  # was a hot loop
        (["--reconcile-interval=inf"], {}, "--reconcile-interval"),
        ([], {"FLANNELD_RECONCILE_INTERVAL": "0"}, "--reconcile-interval"),
        (["--reconcile-interval=1e9"], {}, "--reconcile-interval"),
    ],
)
def test_bad_flags(argv, env, words):
    with pytest.raises(FlagError, match=words):
        parse_options(argv, env)


def test_main_reports_bad_flag_in_one_line(capsys):
    assert main(["--healthz-port=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--healthz-port" in err


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--etcd-endpoints",
        "--etcd-prefix",
        "--etcd-keyfile",
        "--etcd-certfile",
        "--etcd-cafile",
        "--etcd-username",
        "--etcd-password",
        "--iface",
        "--iface-regex",
        "--public-ip",
        "--subnet-file",
        "--subnet-lease-renew-margin",
        "--ip-masq",
        "--healthz-ip",
        "--healthz-port",
        "--version",
        "--state-dir",
    ):
        assert flag in out
