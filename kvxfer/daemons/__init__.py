"""The standalone daemons: `kvxfer serve prefill|decode` and `kvxfer proxy`.

`config` is the contract between the CLI, the daemons and `deploy/`: typed, validated settings
built from flags and `KVXFER_*` environment variables. Nothing below the CLI reads either.
"""
