"""One soak run, start to finish: reference answers, the deployment (CURVE on; on loopback
prefill's side channel behind the relay, or on two hosts of kvxfer.hosts), the supervisor, the load
and the faults, then the leak check."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import httpx

from kvxfer.daemons.cluster import LocalCluster, Running, ServiceSpec
from kvxfer.errors import ConfigError
from kvxfer.hosts import Topology, why_unavailable
from kvxfer.soak.config import SoakConfig
from kvxfer.soak.faults import FaultInjector
from kvxfer.soak.load import LoadGenerator
from kvxfer.soak.prompts import prompt_texts, reference_prompts
from kvxfer.soak.relay import ADVERTISED_HOST, SideChannelRelay
from kvxfer.soak.report import Report
from kvxfer.soak.supervisor import Supervisor

log = logging.getLogger(__name__)
HELD_METRICS = ("kvxfer_blocks_in_use", "kvxfer_blocks_held")
SETTLE_SLACK_S = 20.0


def build_cluster(config: SoakConfig, workdir: Path, topology: Topology | None = None) -> LocalCluster:
    """On loopback prefill advertises the relay's address; on hosts, prefill has a host and
    decode and the proxy share the other (the proxy as a sidecar of decode)."""
    timing = ("--lease-s", str(config.lease_s), "--transfer-deadline-s", str(config.transfer_deadline_s))
    staging = ("--staging-mib", str(config.staging_mib), "--staging-slots", str(config.staging_slots)) \
        if config.staging_mib else ()
    prefill_host = topology.host("prefill") if topology else None
    decode_host = topology.host("decode") if topology else None
    advertise = () if topology else ("--advertise-host", ADVERTISED_HOST)
    return LocalCluster(
        workdir=workdir,
        prefill=[ServiceSpec("prefill", config.prefill_tp, extra=(*timing, *staging, *advertise), host=prefill_host)],
        decode=[ServiceSpec("decode", config.decode_tp,
                            extra=(*timing, *staging, "--transfer-path", config.transfer_path), host=decode_host)],
        preset=config.preset, mode=config.mode, log_level=config.log_level, proxy_host=decode_host,
        proxy_args=("--request-timeout-s", str(config.request_timeout_s)))


def run_soak(config: SoakConfig) -> Report:
    config.validate()
    if config.hosts > 1 and (why := why_unavailable()) is not None:  # say so before minutes of setup
        raise ConfigError(f"soak --hosts {config.hosts}: {why}")
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="kvxfer-soak-"))
    log.info("soak: %d requests at concurrency %d, %d faults, fault seed %d, logs in %s",
             config.num_requests, config.concurrency, config.num_faults, config.fault_seed, workdir)
    prompts = reference_prompts(prompt_texts(config.num_prompts, config.max_prompt_chars, config.seed),
                                preset=config.preset, seed=0, max_tokens=config.max_tokens)
    with contextlib.ExitStack() as stack:
        topology = stack.enter_context(Topology()) if config.hosts > 1 else None
        cluster = build_cluster(config, workdir, topology)
        stack.callback(cluster.stop)
        cluster.start(timeout_s=config.ready_timeout_s)
        relay = None
        if topology is None:
            prefill = cluster.by_name("prefill0")
            relay = SideChannelRelay([prefill.side_port + r for r in range(config.prefill_tp)])
            relay.start()
            stack.callback(relay.stop)
        return _drive(config, cluster, relay, prompts, topology)


def _drive(config: SoakConfig, cluster: LocalCluster, relay: SideChannelRelay | None, prompts,
           topology: Topology | None) -> Report:
    supervisor = Supervisor(cluster)
    supervisor.start()
    load = LoadGenerator(config, cluster.url, prompts)
    started = time.monotonic()
    injector = FaultInjector(config, supervisor, relay, lambda: load.sent, started, topology)
    injector.start()
    try:
        proxy = cluster.proxy
        if proxy is None:
            raise ConfigError("soak: the cluster started no proxy")
        with cluster.reach(proxy):  # the clients stand where the proxy is (its host, or here)
            outcomes = asyncio.run(load.run())
    finally:
        injector.stop()
    seconds = time.monotonic() - started
    try:
        supervisor.wait_ready(supervisor.names, config.ready_timeout_s)
        leaked = settle(cluster, config.lease_s + SETTLE_SLACK_S,
                        staging_slots=config.staging_slots if config.staging_mib else 0)
        failures = {s.name: scrape(cluster, s, "kvxfer_failures_total") for s in cluster.services}
        paths = {s.name: scrape(cluster, s, "kvxfer_transfer_path_total") for s in cluster.services
                 if s.spec.role == "decode"}
    finally:
        supervisor.stop()
    return Report(config=_plain(config), seed=config.seed, fault_seed=config.fault_seed, outcomes=outcomes,
                  faults=injector.events, restarts=dict(supervisor.restarts),
                  liveness_kills=dict(supervisor.liveness_kills), leaked=leaked, seconds=seconds,
                  faults_skipped=injector.skipped, service_failures=failures, transfer_paths=paths)


def settle(cluster: LocalCluster, timeout_s: float, *, staging_slots: int = 0) -> dict[str, int]:
    """Blocks still held on every service once leases had time to expire, and (with staging)
    staging slots still reserved on each decode service's rank 0 (polled until all 0)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = {}
        for svc in cluster.services:
            values = scrape(cluster, svc, *HELD_METRICS, "kvxfer_staging_slots_free")
            for name in HELD_METRICS:
                if name in values or name == "kvxfer_blocks_in_use":
                    held[f"{svc.name} {name}"] = int(values.get(name, -1))
            if staging_slots and svc.spec.role == "decode":
                free = values.get("kvxfer_staging_slots_free")
                held[f"{svc.name} staging slots reserved"] = -1 if free is None else staging_slots - int(free)
        if all(v == 0 for v in held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(1.0)


def scrape(cluster: LocalCluster, svc: Running, *names: str) -> dict[str, float]:
    """Samples of the named metrics from the service's /metrics: {"name" or "name{labels}": value}."""
    try:
        text = cluster.get(svc, "/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, _, value = line.rpartition(" ")
        if key.split("{")[0] in names:
            out[key] = float(value)
    return out


def _plain(config: SoakConfig) -> dict:
    out = dataclasses.asdict(config)
    out["workdir"] = str(config.workdir) if config.workdir else None
    return out
