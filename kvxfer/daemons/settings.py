"""The typed settings of `kvxfer serve` and `kvxfer proxy`, and every default they have.

A default is written once: as the dataclass field's default, or, where it depends on the device or
the role, in `DEVICE_DEFAULTS` / `ROLE_DEFAULTS`. The CLI's help text and its fallbacks read them
from here (kvxfer.daemons.config). The daemons receive these frozen objects and never read flags
or the environment themselves.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kvxfer.agents.messages import Role
from kvxfer.daemons.enums import Device, ModeChoice, RetryPolicy, TransferPathChoice
from kvxfer.deadline import Deadline

MODEL_DTYPES = ("float32", "float16", "bfloat16")


def random_engine_id() -> str:
    return uuid.uuid4().hex


PROXY_PORT = 8000  # the proxy's HTTP port


@dataclass(frozen=True, kw_only=True)
class DeviceDefaults:
    """The defaults that depend on the device."""

    dtype: str
    num_blocks: int | None  # exactly one of num_blocks and memory_fraction is set
    memory_fraction: float | None  # of free GPU memory
    staging_mib: int  # 0 on cpu: a staged copy costs more than the descriptors it saves there


@dataclass(frozen=True, kw_only=True)
class RoleDefaults:
    """The defaults that depend on the service's role: its ports."""

    port: int
    side_channel_port: int


DEVICE_DEFAULTS = {
    Device.CPU: DeviceDefaults(dtype="float32", num_blocks=1024, memory_fraction=None, staging_mib=0),
    Device.CUDA: DeviceDefaults(dtype="bfloat16", num_blocks=None, memory_fraction=0.9, staging_mib=1024),
}
ROLE_DEFAULTS = {
    Role.PREFILL: RoleDefaults(port=8100, side_channel_port=5600),
    Role.DECODE: RoleDefaults(port=8200, side_channel_port=5700),
}


@dataclass(frozen=True, kw_only=True)
class CurveConfig:
    """Where this daemon's side-channel keys come from. Files win over key material from the
    environment; the daemon (kvxfer.daemons.curve) reads the files. Secrets never appear in repr."""

    secret_key_file: Path | None = None
    secret_key: str | None = field(default=None, repr=False)
    public_key_file: Path | None = None
    public_key: str | None = None
    server_key_file: Path | None = None
    server_key: str | None = None
    allowed_keys_dir: Path | None = None
    allowed_keys: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """One prefill or decode service (`kvxfer serve`). Fields without a default here take theirs
    from DEVICE_DEFAULTS or ROLE_DEFAULTS, or are derived (advertise_host)."""

    role: Role
    model_dir: Path | None  # exactly one of model_dir and preset is set
    preset: str | None
    seed: int = 0
    tp: int = 1
    layout: str = "flashinfer-hnd"
    block_size: int = 16
    num_blocks: int | None  # exactly one of num_blocks and memory_fraction is set
    memory_fraction: float | None
    device: Device = Device.CPU
    dtype: str
    host: str = "127.0.0.1"
    port: int
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int  # rank r listens on side_channel_port + r
    advertise_host: str  # default: side_channel_host
    insecure_plaintext: bool = False
    curve: CurveConfig | None = None  # None exactly when insecure_plaintext
    mode: ModeChoice = ModeChoice.AUTO
    deadline: Deadline = Deadline()
    lease_s: float = 30.0
    engine_id: str = field(default_factory=random_engine_id)
    nixl_threads: bool = False
    warmup: bool = True
    staging_mib: int  # staging slots in all (0: no staged transfers; calibration still runs)
    staging_slots: int = 2
    transfer_path: TransferPathChoice = TransferPathChoice.AUTO
    producers: tuple[str, ...] = ()  # decode: rank 0 side channels of prefill services met before /ready
    producers_wait_s: float = 60.0  # decode: how long /ready waits for a producer that does not answer
    kernel_cache: Path | None = None  # compiled kernels (Triton, FlashInfer) kept here; None: the libraries' own

    @property
    def side_channel_ports(self) -> tuple[int, ...]:
        return tuple(self.side_channel_port + rank for rank in range(self.tp))

    # The deadline's two numbers under the names of their flags, for callers written before
    # `deadline` (the daemons' runtime, the deploy checks).
    @property
    def transfer_deadline_s(self) -> float:
        return self.deadline.slack_s

    @property
    def expected_gbps(self) -> float:
        return self.deadline.expected_gbps


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    """The OpenAI-compatible front door (`kvxfer proxy`)."""

    prefill_urls: tuple[str, ...]
    decode_urls: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = PROXY_PORT
    request_timeout_s: float = 120.0
    retry_policy: RetryPolicy = RetryPolicy.RETRY_ONCE
    rehearse: bool = True  # one request of its own through each pair before /ready (kvxfer.daemons.rehearsal)
