"""The NIXL seam: the only module that imports nixl or sees its "READ"/"WRITE"/"DONE"/"ERR" strings.

Read it in the order NIXL wants to be used: create an agent (`NixlAgent`), register each cache
tensor once (`register`), exchange metadata (`metadata`, `add_peer`), prepare descriptor lists
once per (peer, layout) (`prepare`), then per request `post` one transfer per peer with int32
index arrays and `wait` for all of them under one deadline. Plans too large for tables go through
`post_spans` (explicit span lists, no preparation). Every NIXL status and exception is translated
here into `kvxfer.errors` (TransferError, TransferTimeout, PeerGoneError).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from nixl import _bindings as nixl_bindings
from nixl._api import nixl_agent, nixl_agent_config, nixl_prepped_dlist_handle, nixl_xfer_handle

from kvxfer.agents.messages import MemoryKind
from kvxfer.agents.metrics import TransferMetrics
from kvxfer.errors import ConfigError, KvxferError, PeerGoneError, TransferError, TransferTimeout

log = logging.getLogger(__name__)

_LOCAL = "NIXL_INIT_AGENT"
_DISCONNECTED = nixl_bindings.nixlRemoteDisconnectError
_NOT_FOUND = nixl_bindings.nixlNotFoundError  # a peer's metadata, or memory never registered
_NIXL_ERRORS = tuple(
    getattr(nixl_bindings, name) for name in dir(nixl_bindings)
    if name.startswith("nixl") and name.endswith("Error")
)


class Op(Enum):
    """Direction of a transfer, seen from the initiator."""

    READ = "READ"  # pull remote -> local (decode initiates)
    WRITE = "WRITE"  # push local -> remote (prefill initiates)


class Threading(Enum):
    """Who drives NIXL progress.

    APP_POLL: no progress thread; `poll`/`wait`/`collect_notifs` drive progress. On 2 cores this
    measured 1.3-2x the bandwidth and ~1000x faster notification round trips (docs/benchmarks.md).
    PROGRESS_THREAD: NIXL's own thread, which busy-polls about one core even when idle.
    """

    APP_POLL = "app-poll"
    PROGRESS_THREAD = "progress-thread"


class ErrorHandling(Enum):
    """UCX peer-failure handling. NONE enables shared-memory transports (sysv for notifications:
    ~6.5 us instead of ~22 us over tcp). A dead peer still fails the next copy (cma reports it,
    measured); where nothing fails, the deadline ends the wait."""

    NONE = "none"
    PEER = "peer"


def memory_kind(tensor: torch.Tensor) -> MemoryKind:
    """NIXL's memory kind of `tensor` (the wire enum: its values are NIXL's names)."""
    if tensor.device.type == "cpu":
        return MemoryKind.DRAM
    if tensor.device.type == "cuda":
        return MemoryKind.VRAM
    raise ConfigError(f"tensor on device {tensor.device} cannot be registered (cpu or cuda only)")


def device_id(tensor: torch.Tensor) -> int:
    """NIXL's device id: 0 for host memory, the CUDA ordinal for VRAM."""
    return 0 if tensor.device.type == "cpu" else int(tensor.device.index or 0)


@dataclass(frozen=True)
class AgentConfig:
    name: str
    threading: Threading = Threading.APP_POLL
    error_handling: ErrorHandling = ErrorHandling.NONE
    num_workers: int = 1  # UCX workers
    num_threads: int = 0  # UCX backend thread pool splitting large transfers (0: none)
    telemetry: bool = True


@dataclass(frozen=True)
class PollPolicy:
    """Spin for `spin_s`, then sleep with exponential backoff from `min_sleep_s` to `max_sleep_s`.

    Without a progress thread, polling is what moves bytes: a transfer loop spins long and
    sleeps briefly (`for_transfers`). Waiting for a peer's notification only needs to notice it.
    """

    spin_s: float = 0.01
    min_sleep_s: float = 20e-6
    max_sleep_s: float = 1e-3

    @staticmethod
    def for_transfers(threading: Threading) -> PollPolicy:
        if threading is Threading.APP_POLL:
            return PollPolicy(spin_s=1.0, min_sleep_s=5e-6, max_sleep_s=100e-6)
        return PollPolicy(spin_s=0.0, min_sleep_s=20e-6, max_sleep_s=1e-3)


class Backoff:
    """One poll loop's pacing: `pause()` spins, then sleeps longer and longer."""

    def __init__(self, policy: PollPolicy) -> None:
        self._policy = policy
        self._spin_until = time.monotonic() + policy.spin_s
        self._sleep = policy.min_sleep_s

    def pause(self) -> None:
        if time.monotonic() < self._spin_until:
            return
        time.sleep(self._sleep)
        self._sleep = min(self._sleep * 2, self._policy.max_sleep_s)


@dataclass(frozen=True)
class XferStats:
    """NIXL's per-transfer telemetry (microseconds) plus what we asked for."""

    post_us: int
    xfer_us: int
    num_bytes: int
    num_descriptors: int  # after NIXL merged adjacent descriptors


@contextmanager
def nixl_errors(what: str, peer: str = "") -> Iterator[None]:
    """Translate NIXL exceptions raised inside the block into kvxfer errors."""
    where = f"{what} (peer {peer})" if peer else what
    try:
        yield
    except KvxferError:
        raise
    except _DISCONNECTED as err:
        raise PeerGoneError(f"{where}: {type(err).__name__}: {err}") from err
    except _NOT_FOUND as err:
        cls = PeerGoneError if peer else TransferError
        raise cls(f"{where}: {type(err).__name__}: {err} (unknown peer or unregistered memory)") from err
    except _NIXL_ERRORS as err:
        raise TransferError(f"{where}: {type(err).__name__}: {err}") from err


@dataclass(frozen=True)
class DescList:
    """A prepared descriptor list of one side: local (peer == "") or one peer's memory."""

    handle: nixl_prepped_dlist_handle
    peer: str
    mem: MemoryKind
    lengths: np.ndarray  # [N] uint64: bytes of each row, for counting what a request moves
    row_bytes: int = 0  # every row's length when they are all alike (a plan's units), else 0

    @property
    def num_rows(self) -> int:
        return int(self.lengths.size)

    def bytes_of(self, idx: np.ndarray) -> int:
        """Bytes the rows `idx` (in range) hold: one multiply when the rows are alike."""
        return idx.size * self.row_bytes if self.row_bytes else int(self.lengths[idx].sum())


class Transfer:
    """One posted transfer to one peer. `poll` drives it; `release` frees its handle."""

    def __init__(self, agent: NixlAgent, handle: nixl_xfer_handle, *, peer: str, op: Op,
                 num_bytes: int, num_descriptors: int) -> None:
        self._agent = agent
        self._handle = handle
        self.peer = peer
        self.op = op
        self.num_bytes = num_bytes
        self.num_descriptors = num_descriptors
        self.done = False
        self.failed = False  # NIXL reported ERR: UCX ended it, nothing more moves
        self.probe = False  # a calibration probe: counted as op="probe_read"/"probe_write"

    @property
    def running(self) -> bool:
        return not (self.done or self.failed)

    def poll(self) -> bool:
        """True once complete; raises TransferError if NIXL reports a failure."""
        if self.running:
            try:
                with nixl_errors(f"{self.op.value} state", self.peer):
                    state = self._agent._raw.check_xfer_state(self._handle)
                self.done = _check_state(state, f"{self.op.value} from/to peer {self.peer}")
            except TransferError:
                self.failed = True
                raise
        return self.done

    def stats(self) -> XferStats:
        with nixl_errors("transfer telemetry", self.peer):
            t = self._agent._raw.get_xfer_telemetry(self._handle)
        return XferStats(int(t.postDuration), int(t.xferDuration), int(t.totalBytes), int(t.descCount))

    def release(self) -> None:
        """Free the handle; an unfinished transfer is cancelled (best effort, logged)."""
        try:
            with nixl_errors("release transfer", self.peer):
                self._handle.release()
        except TransferError as err:
            log.warning("transfer release failed peer=%s op=%s: %s", self.peer, self.op.value, err)


class Landing:
    """Transfers given up while still running. NIXL cannot stop one: releasing its handle only
    asks UCX to cancel (a posted GET or PUT is not cancelled) and forgetting the peer closes its
    endpoint with a flush, so a READ given up during a partition lands once the link is back
    (docs/two-hosts.md). What can be observed is each transfer's own state: `settled()` polls
    them and is True once every one reported DONE or ERR (their handles are released then).
    Poll it under the lock that guards the agent."""

    def __init__(self, transfers: Sequence[Transfer]) -> None:
        self._running = list(transfers)
        self.since = time.monotonic()

    def settled(self) -> bool:
        still = []
        for xfer in self._running:
            try:
                finished = xfer.poll()
            except TransferError:
                finished = True
            if finished:
                xfer.release()
            else:
                still.append(xfer)
        self._running = still
        return not still

    @property
    def peers(self) -> list[str]:
        return sorted({x.peer for x in self._running})


def _check_state(state: str, where: str) -> bool:
    if state == "DONE":
        return True
    if state == "PROC":
        return False
    raise TransferError(f"{where}: NIXL reported state {state}")


class NixlAgent:
    """A NIXL agent with its registrations, peers and prepared lists, all released on `close`."""

    def __init__(self, config: AgentConfig, *, metrics: TransferMetrics | None = None) -> None:
        if config.num_workers <= 0:
            raise ConfigError(f"num_workers={config.num_workers} must be positive")
        self.config = config
        self.metrics = metrics
        self._stack = ExitStack()
        self._peers: set[str] = set()
        self._inbox: list[tuple[str, bytes]] = []
        with nixl_errors("create agent"):
            self._raw = nixl_agent(config.name, nixl_agent_config(
                enable_prog_thread=config.threading is Threading.PROGRESS_THREAD,
                capture_telemetry=config.telemetry,
                backends=[],
            ))
            self._raw.create_backend("UCX", _ucx_options(config))

    @property
    def name(self) -> str:
        return self.config.name

    def __enter__(self) -> NixlAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release prepared lists, forget peers and deregister memory, newest first."""
        self._stack.close()
        for peer in sorted(self._peers):
            self.remove_peer(peer)

    # Memory -----------------------------------------------------------------------------------

    def register(self, tensors: Sequence[torch.Tensor]) -> MemoryKind:
        """Register cache tensors (one region each) until `close`. All on one kind of memory."""
        if not tensors:
            raise ConfigError("register: no tensors given")
        kinds = {memory_kind(t) for t in tensors}
        if len(kinds) != 1:
            raise ConfigError(f"register: tensors mix memory kinds {sorted(k.value for k in kinds)}")
        for i, t in enumerate(tensors):
            if not t.is_contiguous():
                raise ConfigError(f"register: tensor {i} (shape {tuple(t.shape)}) is not contiguous")
        # regions: [num_tensors, 3] (address, bytes, device)
        regions = np.array([[t.data_ptr(), t.numel() * t.element_size(), device_id(t)] for t in tensors],
                           dtype=np.uint64)
        kind = kinds.pop()
        with nixl_errors("register memory"):
            descs = self._raw.register_memory(regions, kind.value)
        self._stack.callback(self._deregister, descs)
        return kind

    def _deregister(self, descs: object) -> None:
        with nixl_errors("deregister memory"):
            self._raw.deregister_memory(descs)

    # Peers ------------------------------------------------------------------------------------

    def metadata(self) -> bytes:
        """This agent's metadata (name, connection info, registrations), for the side channel."""
        with nixl_errors("get local metadata"):
            return bytes(self._raw.get_agent_metadata())

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's metadata; returns its agent name. Call `connect` to warm the link."""
        with nixl_errors("add remote agent"):
            name = self._raw.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else str(name)
        self._peers.add(name)
        return name

    def connect(self, peer: str) -> None:
        with nixl_errors("make connection", peer):
            self._raw.make_connection(peer)

    def remove_peer(self, peer: str) -> None:
        """Forget a peer (e.g. its boot epoch changed). Lists prepared for it must not be used."""
        self._peers.discard(peer)
        try:
            with nixl_errors("remove remote agent", peer):
                self._raw.remove_remote_agent(peer)
        except TransferError as err:
            log.warning("remove peer failed peer=%s: %s", peer, err)

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._peers)

    # Descriptor lists ---------------------------------------------------------------------------

    def prepare(self, spans: np.ndarray, *, mem: MemoryKind, peer: str = "") -> DescList:
        """Prepare `(N, 3)` uint64 (address, length, device) rows once; requests index them.

        `peer=""` prepares local memory; a peer name prepares that peer's registered memory.
        Released on `close`.
        """
        spans = _as_spans(spans, "prepare")
        with nixl_errors("prepare descriptor list", peer):
            handle = self._raw.prep_xfer_dlist(peer or _LOCAL, spans, mem.value)
        self._stack.callback(handle.release)
        lengths = spans[:, 1].copy()
        alike = lengths.size > 0 and bool((lengths == lengths[0]).all())
        return DescList(handle, peer, mem, lengths, int(lengths[0]) if alike else 0)

    def release_list(self, dlist: DescList) -> None:
        """Release a prepared list now (e.g. its peer restarted); `close` skips it later."""
        with nixl_errors("release descriptor list", dlist.peer):
            dlist.handle.release()  # idempotent: NIXL's handle remembers it was released

    # Transfers ----------------------------------------------------------------------------------

    def post(self, op: Op, local: DescList, local_idx: np.ndarray, remote: DescList,
             remote_idx: np.ndarray, *, notif: bytes = b"") -> Transfer:
        """Make and post one transfer: row local_idx[i] of `local` <-> remote_idx[i] of `remote`."""
        return self.start(self.make(op, local, local_idx, remote, remote_idx, notif=notif))

    def make(self, op: Op, local: DescList, local_idx: np.ndarray, remote: DescList,
             remote_idx: np.ndarray, *, notif: bytes = b"") -> Transfer:
        """`post` without the post (`start` it, or `release` it unposted)."""
        if remote.peer == "" or local.peer != "":
            raise ConfigError("post: `local` must be a local list and `remote` a peer's list")
        local_idx = _as_indices(local_idx, "local")
        remote_idx = _as_indices(remote_idx, "remote")
        if local_idx.size != remote_idx.size:
            raise ConfigError(f"post: {local_idx.size} local indices but {remote_idx.size} remote")
        try:
            with nixl_errors(f"make {op.value}", remote.peer):
                handle = self._raw.make_prepped_xfer(op.value, local.handle, local_idx, remote.handle,
                                                    remote_idx, notif)
        except TransferError:  # NIXL refuses an index outside its list (checked there, not twice
            _check_in_range(local_idx, local, "local")  # on every request): name it
            _check_in_range(remote_idx, remote, "remote")
            raise
        return Transfer(self, handle, peer=remote.peer, op=op, num_bytes=local.bytes_of(local_idx),
                        num_descriptors=int(local_idx.size))

    def post_spans(self, op: Op, local: np.ndarray, remote: np.ndarray, *, peer: str,
                   local_mem: MemoryKind, remote_mem: MemoryKind, notif: bytes = b"", probe: bool = False) -> Transfer:
        """Post explicit paired `(N, 3)` spans without preparation (plans too big for tables).
        NIXL does not merge adjacent rows on this path: coalesce them first. `probe`: a
        calibration transfer, kept apart from requests' transfers in the metrics."""
        xfer = self.make_spans(op, local, remote, peer=peer, local_mem=local_mem, remote_mem=remote_mem,
                               notif=notif)
        xfer.probe = probe
        return self.start(xfer)

    def make_spans(self, op: Op, local: np.ndarray, remote: np.ndarray, *, peer: str,
                   local_mem: MemoryKind, remote_mem: MemoryKind, notif: bytes = b"") -> Transfer:
        """`post_spans` without the post: making the handle costs tens of microseconds, which a
        staged sender spends while its gather kernel runs; `start` it once the data is ready."""
        local, remote = _as_spans(local, "local spans"), _as_spans(remote, "remote spans")
        if local.shape != remote.shape or not np.array_equal(local[:, 1], remote[:, 1]):
            raise ConfigError(f"post_spans: local {local.shape} and remote {remote.shape} spans differ")
        with nixl_errors(f"make {op.value}", peer):
            handle = self._raw.initialize_xfer(
                op.value, self._raw.get_xfer_descs(local, local_mem.value),
                self._raw.get_xfer_descs(remote, remote_mem.value), peer, notif)
        return Transfer(self, handle, peer=peer, op=op, num_bytes=int(local[:, 1].sum()),
                        num_descriptors=int(local.shape[0]))

    def start(self, xfer: Transfer) -> Transfer:
        """Post a transfer made by `make_spans` (released, and the error raised, if NIXL refuses)."""
        try:
            with nixl_errors(f"post {xfer.op.value}", xfer.peer):
                state = self._raw.transfer(xfer._handle)
            xfer.done = _check_state(state, f"post {xfer.op.value} to peer {xfer.peer}")
        except TransferError as err:
            xfer.failed = True
            xfer.release()
            self._failed(err)
            raise
        return xfer

    def wait(self, transfers: Sequence[Transfer], *, timeout_s: float,
             policy: PollPolicy | None = None) -> list[XferStats]:
        """Drive every transfer to completion within `timeout_s`, or raise (and cancel them all).

        Returns each transfer's telemetry (zeros when telemetry is off) and releases the handles.
        """
        policy = policy or PollPolicy.for_transfers(self.config.threading)
        deadline, backoff = time.monotonic() + timeout_s, Backoff(policy)
        try:
            while not all([x.poll() for x in transfers]):
                if time.monotonic() > deadline:
                    left = sorted({x.peer for x in transfers if not x.done})
                    raise TransferTimeout(
                        f"{len(left)} transfer(s) to peer(s) {left} not done after {timeout_s:.3f} s")
                backoff.pause()
            stats = [self._stats(x) for x in transfers]
        except TransferError as err:
            self._failed(err)
            self.abandon(transfers, err)
            raise
        for x in transfers:
            x.release()
        return stats

    def abandon(self, transfers: Sequence[Transfer], err: TransferError) -> None:
        """A request gives up `transfers`: release the finished ones, and hand the ones still
        running to the error as its `landing` (see Landing) instead of pretending to cancel them."""
        running = [x for x in transfers if x.running]
        for x in transfers:
            if not x.running:
                x.release()
        if running:
            err.landing = Landing(running)
            log.warning("agent=%s: %d transfer(s) to %s given up while still running; their local memory "
                        "stays reserved until each ends", self.name, len(running), sorted({x.peer for x in running}))

    def _stats(self, xfer: Transfer) -> XferStats:
        if self.config.telemetry:
            stats = xfer.stats()
        else:
            stats = XferStats(0, 0, xfer.num_bytes, xfer.num_descriptors)
        if self.metrics is not None:
            self.metrics.observe_transfer(("probe_" if xfer.probe else "") + xfer.op.value.lower(), stats)
        return stats

    def _failed(self, err: TransferError) -> None:
        log.error("transfer failed agent=%s kind=%s: %s", self.name, err.kind, err)
        if self.metrics is not None:
            self.metrics.observe_failure(err.kind)

    # Notifications ------------------------------------------------------------------------------

    def send_notif(self, peer: str, payload: bytes) -> None:
        """A standalone notification (payload msgspec-encoded by the caller)."""
        with nixl_errors("send notification", peer):
            self._raw.send_notif(peer, payload)

    def progress(self) -> None:
        """Drive NIXL once (a passive side must, without a progress thread, for connection
        set-up and notifications); notifications that arrive are kept for `collect_notifs`."""
        with nixl_errors("get notifications"):
            new = self._raw.get_new_notifs()
        self._inbox.extend((_text(peer), bytes(msg)) for peer, msgs in new.items() for msg in msgs)

    def collect_notifs(self) -> list[tuple[str, bytes]]:
        """(peer, payload) of every notification that arrived since the last call, in order."""
        self.progress()
        got, self._inbox = self._inbox, []
        return got

    def wait_notifs(self, count: int, *, timeout_s: float,
                    policy: PollPolicy = PollPolicy()) -> list[tuple[str, bytes]]:
        """Collect notifications until `count` arrived, or raise TransferTimeout."""
        deadline, backoff = time.monotonic() + timeout_s, Backoff(policy)
        got: list[tuple[str, bytes]] = []
        while True:
            got.extend(self.collect_notifs())
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                err = TransferTimeout(f"{len(got)} of {count} notification(s) after {timeout_s:.3f} s")
                self._failed(err)
                raise err
            backoff.pause()


def quiet_nixl_logs(level: int = logging.WARNING) -> None:
    """NIXL's Python logger prints INFO lines on stdout; keep stdout for our own output."""
    logging.getLogger("nixl").setLevel(level)


def _ucx_options(config: AgentConfig) -> dict[str, str]:
    options = {
        "ucx_error_handling_mode": config.error_handling.value,
        "num_workers": str(config.num_workers),
    }
    if config.num_threads > 0:
        options["num_threads"] = str(config.num_threads)
    return options


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _as_spans(spans: np.ndarray, who: str) -> np.ndarray:
    spans = np.ascontiguousarray(spans, dtype=np.uint64)
    if spans.ndim != 2 or spans.shape[1] != 3 or spans.shape[0] == 0:
        raise ConfigError(f"{who}: spans must be a non-empty (N, 3) array, got shape {spans.shape}")
    return spans


def _as_indices(idx: np.ndarray, who: str) -> np.ndarray:
    idx = np.ascontiguousarray(idx, dtype=np.int32)
    if idx.ndim != 1 or idx.size == 0:
        raise ConfigError(f"post: {who} indices must be a non-empty 1-d array, got shape {idx.shape}")
    return idx


def _check_in_range(idx: np.ndarray, dlist: DescList, who: str) -> None:
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= dlist.num_rows:
        raise ConfigError(f"post: {who} index {lo if lo < 0 else hi} outside [0, {dlist.num_rows})")
