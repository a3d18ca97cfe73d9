"""The agent: this node's lease, the peer watch, and the wiring from the peer set to the
backend's reconcile loop."""
