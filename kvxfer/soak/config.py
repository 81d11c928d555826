"""What one soak run does: load, faults, topology and bounds, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvxfer.daemons.enums import ModeChoice, TransferPathChoice, values
from kvxfer.errors import ConfigError

MODES = values(ModeChoice)  # what `kvxfer serve --mode` takes
TRANSFER_PATHS = values(TransferPathChoice)

# Faults the injector chooses from (client aborts are the load generator's, see load.py).
KILL_PREFILL_RANK = "kill_prefill_rank"  # SIGKILL one rank process of the prefill service
KILL_DECODE_RANK = "kill_decode_rank"  # SIGKILL one rank process of the decode service
RESTART_SERVICE = "restart_service"  # SIGTERM a whole service, start it again
PAUSE_RANK = "pause_rank"  # SIGSTOP one rank process past the transfer deadline, then SIGCONT
DROP_SIDE_CHANNEL = "drop_side_channel"  # reset every TCP connection to prefill's side channel
CLIENT_ABORT = "client_abort"  # a streaming client hangs up mid-stream
# Only with hosts >= 2 (kvxfer.hosts): the link between prefill's and decode's hosts goes down for
# a while (silent drops both ways: side channel, NIXL/UCX and the proxy's HTTP to prefill), then up.
LINK_DOWN = "link_down"
FAULT_KINDS = (KILL_PREFILL_RANK, KILL_DECODE_RANK, RESTART_SERVICE, PAUSE_RANK, DROP_SIDE_CHANNEL)
HOST_FAULT_KINDS = (LINK_DOWN,)
ALL_FAULT_KINDS = FAULT_KINDS + HOST_FAULT_KINDS
# Killing and restarting costs a restart (tens of seconds on a busy CPU); pauses, drops and link
# faults do not.
DEFAULT_WEIGHTS = {KILL_PREFILL_RANK: 1.0, KILL_DECODE_RANK: 1.0, RESTART_SERVICE: 1.0,
                   PAUSE_RANK: 3.0, DROP_SIDE_CHANNEL: 3.0, LINK_DOWN: 6.0}
HOSTS = (1, 2)  # 1: every process on this machine's loopback; 2: prefill and decode hosts


def fault_kinds(hosts: int) -> tuple[str, ...]:
    """The faults a topology can take: link faults need hosts of their own."""
    return ALL_FAULT_KINDS if hosts > 1 else FAULT_KINDS


@dataclass(frozen=True, kw_only=True)
class SoakConfig:
    num_requests: int = 2000
    concurrency: int = 4
    max_time_s: float = 3600.0  # the load stops sending after this long
    num_faults: int = 60  # injected faults (client aborts not counted), spread over the requests
    seed: int = 0  # the load's choices (prompts, lengths, streams, aborts)
    fault_seed: int = 0  # the injector's choices; recorded in the report
    weights: dict[str, float] = field(default_factory=lambda: {k: DEFAULT_WEIGHTS[k] for k in FAULT_KINDS})
    hosts: int = 1  # 2: prefill on one host, decode and the proxy on another (kvxfer.hosts)
    prefill_tp: int = 2
    decode_tp: int = 4
    preset: str = "tiny-demo"
    mode: str = "read"  # how decode moves KV: read, write, auto
    staging_mib: int = 0  # staging area per rank (0: none, the CPU default)
    staging_slots: int = 2
    transfer_path: str = "auto"  # decode's --transfer-path: auto, direct, staged
    num_prompts: int = 24  # distinct prompts, lengths spread over [1, max_prompt_chars]
    max_prompt_chars: int = 240
    min_tokens: int = 2
    max_tokens: int = 8
    stream_fraction: float = 0.3
    abort_fraction: float = 0.1  # of streamed requests
    request_timeout_s: float = 60.0  # the proxy's end-to-end bound (a 504 after it)
    client_slack_s: float = 30.0  # client bound = request_timeout_s + this; past it: hung
    lease_s: float = 6.0
    transfer_deadline_s: float = 2.0
    max_link_down_s: float = 8.0  # a link fault lasts 1 s to this long (past a lease, by default)
    ready_timeout_s: float = 300.0  # a (re)started service must be ready within this
    workdir: Path | None = None
    log_level: str = "WARNING"

    @property
    def client_bound_s(self) -> float:
        return self.request_timeout_s + self.client_slack_s

    def validate(self) -> SoakConfig:
        checks = [
            (self.num_requests >= 1, f"num_requests={self.num_requests} must be >= 1"),
            (self.concurrency >= 1, f"concurrency={self.concurrency} must be >= 1"),
            (self.num_faults >= 0, f"num_faults={self.num_faults} must be >= 0"),
            (self.max_time_s > 0, f"max_time_s={self.max_time_s} must be positive"),
            (1 <= self.min_tokens <= self.max_tokens, f"tokens [{self.min_tokens}, {self.max_tokens}] must be 1 <= min <= max"),
            (0 <= self.stream_fraction <= 1, f"stream_fraction={self.stream_fraction} outside [0, 1]"),
            (0 <= self.abort_fraction <= 1, f"abort_fraction={self.abort_fraction} outside [0, 1]"),
            (self.lease_s > self.transfer_deadline_s, f"lease_s={self.lease_s} must exceed transfer_deadline_s"),
            (self.num_prompts >= 1 and self.max_prompt_chars >= 1, "need at least one prompt of one character"),
            (self.hosts in HOSTS, f"hosts={self.hosts} is not one of {', '.join(map(str, HOSTS))}"),
            (set(self.weights) <= set(fault_kinds(self.hosts)),
             f"fault kinds {sorted(set(self.weights) - set(fault_kinds(self.hosts)))} not possible with "
             f"hosts={self.hosts} (possible: {', '.join(fault_kinds(self.hosts))})"),
            (self.max_link_down_s >= 1.0, f"max_link_down_s={self.max_link_down_s} must be >= 1"),
            (self.num_faults == 0 or sum(self.weights.values()) > 0, "every fault weight is 0"),
            (self.mode in MODES, f"mode={self.mode!r} is not one of {', '.join(MODES)}"),
            (self.transfer_path in TRANSFER_PATHS,
             f"transfer_path={self.transfer_path!r} is not one of {', '.join(TRANSFER_PATHS)}"),
            (self.transfer_path != "staged" or (self.staging_mib > 0 and self.mode != "read"),
             f"transfer_path=staged needs staging_mib > 0 (got {self.staging_mib}) and mode write or auto "
             f"(got {self.mode})"),
            (self.staging_mib >= 0 and self.staging_slots >= 1,
             f"staging_mib={self.staging_mib} and staging_slots={self.staging_slots} must be >= 0 and >= 1"),
        ]
        for ok, why in checks:
            if not ok:
                raise ConfigError(f"soak: {why}")
        return self
