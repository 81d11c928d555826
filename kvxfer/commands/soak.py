"""`kvxfer soak`: the CPU demo topology (prefill TP 2 -> decode TP 4, proxy, CURVE on) under a
bounded load and random faults: SIGKILL of a prefill or decode rank, service restarts, a rank
paused past the transfer deadline, side-channel connections reset, clients hanging up mid-stream.
With --hosts 2, prefill runs on one host and decode and the proxy on another (network namespaces
joined by a switch, as the Kubernetes manifests start pods, UCX over TCP; needs root), and the
link between them goes down and up again as one more fault.
A supervisor restarts services that exit. Prints one table; exits 1 if any answer was wrong, any
request hung or failed without a clear error, or any block stayed held after leases expired."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from pathlib import Path

from kvxfer.soak.config import (
    ALL_FAULT_KINDS,
    DEFAULT_WEIGHTS,
    HOSTS,
    MODES,
    TRANSFER_PATHS,
    SoakConfig,
    fault_kinds,
)

log = logging.getLogger("kvxfer.soak")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soak", help="load + random faults on the demo topology; one table, exit 1 on a violation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SoakConfig()
    p.add_argument("--requests", type=int, default=d.num_requests, help=f"requests to send (default: {d.num_requests})")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help=f"requests in flight (default: {d.concurrency})")
    p.add_argument("--faults", type=int, default=d.num_faults, help=f"faults to inject, spread over the requests (default: {d.num_faults})")
    p.add_argument("--max-time-s", type=float, default=d.max_time_s, help=f"stop sending after this long (default: {d.max_time_s:.0f})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the load's choices (default: 0)")
    p.add_argument("--fault-seed", type=int, help="seed of the injector's choices (default: random, printed)")
    p.add_argument("--fault-kinds", nargs="+", choices=ALL_FAULT_KINDS,
                   help=f"faults to choose from (default: all the topology can take; {', '.join(ALL_FAULT_KINDS[-1:])} "
                        "needs --hosts 2)")
    p.add_argument("--hosts", type=int, choices=HOSTS, default=d.hosts,
                   help="1: every process on loopback; 2: prefill on one host, decode and the proxy on another "
                        f"(network namespaces; root) (default: {d.hosts})")
    p.add_argument("--max-link-down-s", type=float, default=d.max_link_down_s,
                   help=f"a link fault lasts 1 s to this long (default: {d.max_link_down_s})")
    p.add_argument("--min-tokens", type=int, default=d.min_tokens, help=f"fewest tokens per request (default: {d.min_tokens})")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"most tokens per request (default: {d.max_tokens})")
    p.add_argument("--prefill-tp", type=int, default=d.prefill_tp, help=f"prefill TP size (default: {d.prefill_tp})")
    p.add_argument("--decode-tp", type=int, default=d.decode_tp, help=f"decode TP size (default: {d.decode_tp})")
    p.add_argument("--preset", default=d.preset, help=f"random model preset (default: {d.preset})")
    p.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s,
                   help=f"the proxy's bound per request (default: {d.request_timeout_s:.0f})")
    p.add_argument("--lease-s", type=float, default=d.lease_s, help=f"prefill lease (default: {d.lease_s})")
    p.add_argument("--transfer-deadline-s", type=float, default=d.transfer_deadline_s,
                   help=f"transfer deadline slack (default: {d.transfer_deadline_s})")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help=f"how decode moves KV (default: {d.mode})")
    p.add_argument("--staging-mib", type=int, default=d.staging_mib,
                   help="staging area per rank, for staged WRITEs (default: 0, none)")
    p.add_argument("--staging-slots", type=int, default=d.staging_slots,
                   help=f"slots the staging area is split into (default: {d.staging_slots})")
    p.add_argument("--transfer-path", choices=TRANSFER_PATHS, default=d.transfer_path,
                   help="decode's choice of path; `staged` with --mode write and --staging-mib soaks staged "
                        f"transfers (default: {d.transfer_path})")
    p.add_argument("--workdir", type=Path, help="logs and keys (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line after the table")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    fault_seed = args.fault_seed if args.fault_seed is not None else secrets.randbelow(2**31)
    kinds = args.fault_kinds or fault_kinds(args.hosts)
    return SoakConfig(
        num_requests=args.requests, concurrency=args.concurrency, max_time_s=args.max_time_s,
        num_faults=args.faults, seed=args.seed, fault_seed=fault_seed,
        weights={k: DEFAULT_WEIGHTS[k] for k in kinds}, hosts=args.hosts,
        max_link_down_s=args.max_link_down_s, min_tokens=args.min_tokens,
        max_tokens=args.max_tokens, prefill_tp=args.prefill_tp, decode_tp=args.decode_tp, preset=args.preset,
        request_timeout_s=args.request_timeout_s, lease_s=args.lease_s,
        transfer_deadline_s=args.transfer_deadline_s, mode=args.mode, staging_mib=args.staging_mib,
        staging_slots=args.staging_slots, transfer_path=args.transfer_path, workdir=args.workdir).validate()


def run(args: argparse.Namespace) -> int:
    from kvxfer.soak import run_soak

    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = config_from_args(args)
    print(f"kvxfer soak: fault seed {config.fault_seed}, load seed {config.seed}", file=sys.stderr, flush=True)
    report = run_soak(config)
    print(report.table())
    violations = report.violations()
    for line in violations:
        print(f"VIOLATION: {line}")
    print("soak: PASS" if not violations else "soak: FAIL")
    if args.json:
        print(report.to_json())
    return 1 if violations else 0
