"""Rank processes of a service, found through /proc: rank 0 is the service's process, ranks
1..N-1 are the children it spawned (multiprocessing `spawn_main`, not its resource tracker)."""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def _ppid(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")"
    return int(stat.rpartition(")")[2].split()[1])


def _cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rank_pids(rank0_pid: int) -> list[int]:
    """[rank 0, then worker ranks in spawn (pid) order]; only rank 0 when /proc shows no worker."""
    workers = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and _ppid(int(entry.name)) == rank0_pid:
            cmd = _cmdline(int(entry.name))
            if "spawn_main" in cmd and "resource_tracker" not in cmd:
                workers.append(int(entry.name))
    return [rank0_pid, *sorted(workers)]


    return True
