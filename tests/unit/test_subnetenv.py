import os
import stat
from ipaddress import IPv4Network

from flanneld.edges import subnetenv


def test_render_matches_reference_format():
    text = subnetenv.render(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.52.0/24"), 1450, False)
    assert text == (
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    )


def test_atomic_write_mode_and_read_back(tmp_path):
    path = tmp_path / "run" / "flannel" / "subnet.env"
    old = os.umask(0o077)
    try:
        subnetenv.write(
            path,
            subnetenv.render(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.52.0/24"), 1500, True),
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["subnet.env"]  # no temp file left
    assert subnetenv.previous_subnet(path) == IPv4Network("10.5.52.0/24")


def test_previous_subnet_edge_cases(tmp_path):
    p = tmp_path / "s.env"
    assert subnetenv.previous_subnet(p) is None  # missing file
    for body, want in [
        ('FLANNEL_SUBNET="10.1.2.1/24"\n', "10.1.2.0/24"),
        ("# c\nexport FLANNEL_SUBNET=10.1.2.1/24\n", "10.1.2.0/24"),
        ("FLANNEL_SUBNET=10.1.2.1/24,10.1.3.1/24\n", None),
        ("FLANNEL_SUBNET=garbage\n", None),
        ("FLANNEL_SUBNET=fc00::1/64\n", None),
        ("", None),
    ]:
        p.write_text(body)
        got = subnetenv.previous_subnet(p)
        assert got == (IPv4Network(want) if want else None), body
