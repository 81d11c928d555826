"""Kernel builds in this process: every Triton kernel compiled or loaded from its disk cache,
and FlashInfer's JIT libraries built by kvxfer's warmup, each logged with its name, shape and
time, and counted before and after the process's service said it was ready.

A warm service compiles nothing once ready: its copiers and attention kernels are built while
it starts and meets its producers, and `kvxfer warmup` leaves them in a cache directory that an
image ships (`use_cache_dir`), so a restarted pod only loads them. A compile after ready is a
request paying for it; the log says so (WARNING) and `/metrics` counts it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRITON = "triton"
FLASHINFER = "flashinfer"


@dataclass(frozen=True)
class Build:
    compiler: str  # TRITON or FLASHINFER
    name: str  # the kernel and what it was specialised on
    seconds: float
    compiled: bool  # False: loaded from the disk cache
    after_ready: bool


class KernelLog:
    """The builds of one process, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._builds: list[Build] = []

    def mark_ready(self) -> None:
        """From now on a compile is on some request's path."""
        with self._lock:
            self._ready = True

    def record(self, compiler: str, name: str, seconds: float, *, compiled: bool) -> Build:
        with self._lock:
            build = Build(compiler, name, seconds, compiled, self._ready)
            self._builds.append(build)
        if compiled and build.after_ready:
            log.warning("kernel compiled after ready (a request waits for it): %s %s in %.2f s", compiler, name, seconds)
        elif compiled:
            log.info("kernel compiled: %s %s in %.2f s", compiler, name, seconds)
        else:
            log.info("kernel loaded from the cache: %s %s in %.3f s", compiler, name, seconds)
        return build

    def compiles(self, *, after_ready: bool) -> int:
        with self._lock:
            return sum(1 for b in self._builds if b.compiled and b.after_ready == after_ready)

    def builds(self) -> list[Build]:
        with self._lock:
            return list(self._builds)


KERNELS = KernelLog()  # one per process, as Triton's compile listener is
_watching = threading.Lock()
_watched = False


def watch_triton() -> bool:
    """Record every Triton compile of this process in KERNELS (once; chains a listener someone
    else set). False where this Triton has no compile listener (older than 3.4) or none is
    installed."""
    global _watched
    try:
        from triton import knobs
    except ImportError:
        return False
    with _watching:
        if _watched:
            return True
        if not hasattr(knobs.compilation, "listener"):
            return False
        previous = knobs.compilation.listener

        def listener(*, src: Any, metadata: Any, metadata_group: Any, times: Any, cache_hit: bool) -> None:
            KERNELS.record(TRITON, _triton_name(src), _seconds(times), compiled=not cache_hit)
            if previous is not None:
                previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times, cache_hit=cache_hit)

        knobs.compilation.listener = listener
        _watched = True
        return True


def _triton_name(src: Any) -> str:
    fn = getattr(src, "fn", None)
    name = getattr(getattr(fn, "fn", fn), "__name__", None) or getattr(src, "name", "kernel")
    constants = getattr(src, "constants", None) or {}
    shown = ", ".join(f"{_arg_name(fn, k)}={v}" for k, v in constants.items() if isinstance(v, int | bool | str))
    return f"{name}({shown})" if shown else str(name)


def _arg_name(fn: Any, key: Any) -> str:
    names = getattr(fn, "arg_names", None)
    index = key[0] if isinstance(key, tuple) and key else key
    return names[index] if isinstance(index, int) and names and index < len(names) else str(key)


def _seconds(times: Any) -> float:
    """CompileTimes (microseconds by stage) to seconds; 0 where this Triton reports none."""
    micros = getattr(times, "ir_initialization", 0) + getattr(times, "store_results", 0)
    micros += sum(us for _, us in getattr(times, "lowering_stages", ()) or ())
    return micros / 1e6


def use_cache_dir(directory: str | os.PathLike[str]) -> Path:
    """Keep this process's (and its children's) compiled kernels under `directory`: Triton's in
    `triton/`, FlashInfer's JIT libraries in `.cache/flashinfer/` (FlashInfer's own layout under
    its workspace base). Both libraries read these when first imported: call this before."""
    root = Path(directory).resolve()
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    os.environ["FLASHINFER_WORKSPACE_BASE"] = str(root)
    return root
