"""The pure core: options, config, subnet arithmetic, lease records and keys, the rules a record
must pass, the peer table, subnet choice, schedules. No I/O: nothing here imports aetcd,
pyroute2, socket, subprocess or threading (import-linter checks it)."""
