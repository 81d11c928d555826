"""`kvxfer bench`: real NIXL transfers between spawned processes, one per rank.

config.py (what to run, what is reported), cache.py (each rank's cache, contents and
verification), initiator.py (plans per peer, posting), rank.py (the rank process), session.py
(the coordinator). Import `kvxfer.bench.session` for `run_bench` / `BenchSession`.
"""
