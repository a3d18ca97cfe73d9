"""When the agent runs its full reconcile passes: a pure rule, so it is tested without a loop."""

from __future__ import annotations

FULL_PASS_SHARE = 0.05  # at most this share of the time goes to full passes (see below)


def full_pass_period(interval: float, last_full: float) -> float:
    """Seconds from the end of one full pass to the next: --reconcile-interval, or longer
    where a full pass takes long (vxlan with thousands of peers: about 2 s), so that full
    passes take at most FULL_PASS_SHARE of the time. Peer events are applied at once anyway;
    only the repair of entries changed behind the agent's back waits longer."""
    return max(interval, last_full / FULL_PASS_SHARE)
