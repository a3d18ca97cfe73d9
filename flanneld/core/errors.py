"""The agent's one error hierarchy: `FlannelError` is what a user, an operator or a peer can
cause (a bad flag, config or record, an unreachable etcd), with a one-sentence message that
names the fix; callers catch it instead of keeping lists. Each kind keeps the built-in base
it had (ValueError for bad input, RuntimeError for a state of the world)."""

from __future__ import annotations


class FlannelError(Exception):
    """Something outside the code went wrong; the message says what and how to fix it."""


class InputError(FlannelError, ValueError):
    """Bad input: a flag, the network config, a lease record."""


class StateError(FlannelError, RuntimeError):
    """The world is not as the agent needs it: etcd, the host, the kernel."""
