"""The backend benchmark's parts; `deploy/benchmark.py` is its command.

stats (medians, percentiles, ratios; pure), report (tables, JSON, chart), measure (what every
run shares: its error, the agent's CPU and memory), datapath (iperf3, round trips, join time)
and scale (synthetic peers, convergence).
"""
