"""Transfer stats for vLLM's metrics: each worker reports what it moved since its last report,
vLLM aggregates the workers' reports and logs `reduce()` ("KV Transfer metrics: ...")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

_COUNTERS = ("num_loads", "num_failed_loads", "num_bytes", "num_descriptors", "transfer_s",
             "num_leases_ended")


@dataclass
class KvxferStats(KVConnectorStats):
    """`data` holds plain numbers (vLLM sends it between processes) under `_COUNTERS` and
    `failures_<kind>` for each kvxfer error kind seen."""

    def __post_init__(self) -> None:
        for name in _COUNTERS:
            self.data.setdefault(name, 0)

    def record_load(self, *, num_bytes: int, num_descriptors: int, seconds: float) -> None:
        self.data["num_loads"] += 1
        self.data["num_bytes"] += num_bytes
        self.data["num_descriptors"] += num_descriptors
        self.data["transfer_s"] += seconds

    def record_failure(self, kind: str) -> None:
        self.data["num_failed_loads"] += 1
        key = f"failures_{kind}"
        self.data[key] = self.data.get(key, 0) + 1

    def record_leases_ended(self, count: int) -> None:
        self.data["num_leases_ended"] += count

    def reset(self) -> None:
        self.data = {name: 0 for name in _COUNTERS}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        seconds = d["transfer_s"]
        out: dict[str, int | float] = {
            "loads": d["num_loads"],
            "failed_loads": d["num_failed_loads"],
            "MB": round(d["num_bytes"] / 1e6, 3),
            "GB/s": round(d["num_bytes"] / seconds / 1e9, 3) if seconds > 0 else 0.0,
            "descriptors": d["num_descriptors"],
            "leases_ended": d["num_leases_ended"],
        }
        out.update({k: v for k, v in d.items() if k.startswith("failures_")})
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)
