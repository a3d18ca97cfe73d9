"""How often the agent compares the whole kernel state with what it wants."""

import pytest

from flanneld.daemon import FULL_PASS_SHARE, full_pass_period


@pytest.mark.parametrize(
    ("interval", "last_full", "period"),
    [
        (10.0, 0.12, 10.0),  # host-gw, 1,000 peers: the flag rules
        (10.0, 0.5, 10.0),  # exactly the share
        (10.0, 2.2, 44.0),  # vxlan, 5,000 peers: spaced out
        (60.0, 2.2, 60.0),  # a long interval stays
        (0.5, 0.1, 2.0),
    ],
)
def test_full_passes_take_at_most_their_share_of_the_time(
    interval: float, last_full: float, period: float
) -> None:
    assert full_pass_period(interval, last_full) == pytest.approx(period)
    assert last_full / full_pass_period(interval, last_full) <= FULL_PASS_SHARE + 1e-9
