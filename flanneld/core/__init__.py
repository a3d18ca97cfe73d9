"""The pure core: options, config, subnet arithmetic, lease records and keys, the rules a record
must pass, the peer table, subnet choice, schedules, the firewall rule sets and their renderings,
errors, stats, text tables. No I/O: nothing here imports aetcd, grpc, pyroute2, pytun, socket,
subprocess or threading (import-linter checks it)."""
