"""The soak's one table (and its JSON): what was sent, what came back, what was injected, and the
must-be-zero lines (wrong answers, hung requests, unclear failures, leaked blocks)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from kvxfer.soak.config import CLIENT_ABORT, fault_kinds
from kvxfer.soak.faults import FaultEvent
from kvxfer.soak.load import ABORTED, FAILED, HUNG, OK, UNCLEAR, WRONG, Outcome
from kvxfer.tables import format_table


@dataclass
class Report:
    config: dict
    seed: int
    fault_seed: int
    outcomes: list[Outcome]
    faults: list[FaultEvent]
    restarts: dict[str, int]  # supervisor restarts by service
    liveness_kills: dict[str, int]  # services the supervisor killed for failing /health (wedged)
    leaked: dict[str, int]  # blocks still in use after leases expired, by service ("service/metric")
    seconds: float = 0.0
    faults_skipped: int = 0
    # kvxfer_failures_total of each service at the end: since its last restart only
    service_failures: dict[str, dict[str, float]] = field(default_factory=dict)
    # kvxfer_transfer_path_total of each decode service at the end: since its last restart only
    transfer_paths: dict[str, dict[str, float]] = field(default_factory=dict)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes if o.outcome == outcome)

    def failed_by_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(o.kind for o in self.outcomes if o.outcome == FAILED).items()))

    def unclear_by_what(self) -> dict[str, int]:
        return dict(Counter(o.kind for o in self.outcomes if o.outcome == UNCLEAR))

    def fault_counts(self) -> dict[str, int]:
        counts = Counter(e.kind for e in self.faults)
        out = {k: counts.get(k, 0) for k in fault_kinds(self.config.get("hosts", 1))}
        out[CLIENT_ABORT] = self.count(ABORTED)
        return out

    def latency(self, q: float) -> float:
        times = sorted(o.seconds for o in self.outcomes if o.outcome == OK)
        if not times:
            return 0.0
        return times[min(len(times) - 1, int(q * len(times)))]

    def violations(self) -> list[str]:
        out = []
        for name, value in (("wrong answers", self.count(WRONG)), ("hung requests", self.count(HUNG)),
                            ("unclear failures", self.count(UNCLEAR)),
                            ("liveness kills", sum(self.liveness_kills.values()))):
            if value:
                out.append(f"{name}: {value} (must be 0)")
        for where, value in self.leaked.items():  # -1: the service did not answer /metrics
            if value:
                out.append(f"leaked blocks on {where}: {value} (must be 0; -1: unreadable)")
        if len(self.outcomes) != self.config["num_requests"]:
            out.append(f"requests sent: {len(self.outcomes)} of {self.config['num_requests']} (the time bound cut the load)")
        return out

    def rows(self) -> list[list[object]]:
        rows: list[list[object]] = [
            ["requests sent", len(self.outcomes), ""],
            ["answered correctly (token for token)", self.count(OK), ""],
            ["aborted by the client mid-stream (prefix checked)", self.count(ABORTED), ""],
        ]
        rows += [[f"failed with a clear error: {kind}", n, ""] for kind, n in self.failed_by_kind().items()]
        rows += [
            ["wrong answers", self.count(WRONG), "must be 0"],
            ["hung requests", self.count(HUNG), "must be 0"],
            ["unclear failures", self.count(UNCLEAR), "must be 0"],
        ]
        rows += [[f"leaked blocks: {svc}", n, "must be 0"] for svc, n in sorted(self.leaked.items())]
        rows += [[f"transfers since the last start: {svc} {key.partition('{')[2].rstrip('}')}", int(n), ""]
                 for svc, samples in sorted(self.transfer_paths.items()) for key, n in sorted(samples.items())]
        rows += [["latency p50 (answered), s", round(self.latency(0.5), 3), ""],
                 ["latency p99 (answered), s", round(self.latency(0.99), 3), ""]]
        rows += [[f"fault: {kind}", n, ""] for kind, n in self.fault_counts().items()]
        rows += [["faults injected (client aborts not counted)", len(self.faults), ""]]
        rows += [[f"supervisor restarts: {svc}", n, ""] for svc, n in sorted(self.restarts.items())]
        rows += [["liveness kills (a service wedged)", sum(self.liveness_kills.values()), "must be 0"]]
        if self.config.get("hosts", 1) > 1:
            rows += [["hosts (prefill | decode + proxy, UCX over TCP)", self.config["hosts"], ""]]
        rows += [["fault seed / load seed", f"{self.fault_seed} / {self.seed}", ""],
                 ["wall time, s", round(self.seconds, 1), ""]]
        return rows

    def table(self) -> str:
        return format_table(["soak", "value", "check"], self.rows())

    def to_json(self) -> str:
        return json.dumps({
            "config": self.config, "seed": self.seed, "fault_seed": self.fault_seed,
            "requests_sent": len(self.outcomes), "answered_correctly": self.count(OK),
            "aborted_by_client": self.count(ABORTED), "failed_by_kind": self.failed_by_kind(),
            "wrong": self.count(WRONG), "hung": self.count(HUNG), "unclear": self.count(UNCLEAR),
            "unclear_by_what": self.unclear_by_what(), "leaked_blocks": self.leaked,
            "latency_p50_s": self.latency(0.5), "latency_p99_s": self.latency(0.99),
            "faults": self.fault_counts(), "faults_injected": len(self.faults),
            "faults_skipped": self.faults_skipped, "restarts": self.restarts, "liveness_kills": self.liveness_kills,
            "service_failures": self.service_failures, "transfer_paths": self.transfer_paths,
            "seconds": self.seconds,
            "fault_events": [asdict(e) for e in self.faults], "violations": self.violations(),
        })
