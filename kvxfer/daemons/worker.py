"""Ranks 1..N-1 of a service: build the rank, report, then run rank 0's commands until told to stop."""

from __future__ import annotations

import logging
import multiprocessing.connection as mpc
import os
import signal

from kvxfer.daemons.bus import Failed, serve_commands
from kvxfer.daemons.commands import Described, command_decoder, command_encoder
from kvxfer.daemons.rank_setup import RankSetup
from kvxfer.daemons.runtime import build_runtime
from kvxfer.errors import KvxferError

log = logging.getLogger(__name__)


def worker_main(setup: RankSetup, log_level: str, conn: mpc.Connection) -> None:
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s rank{setup.rank} %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 owns shutdown; Ctrl-C reaches the group
    try:
        runtime = build_runtime(setup)
    except KvxferError as err:
        conn.send_bytes(command_encoder.encode(Failed(kind=err.kind, message=str(err))))
        return
    except Exception as err:
        log.exception("rank %d failed to start", setup.rank)
        conn.send_bytes(command_encoder.encode(Failed(kind="internal", message=f"{type(err).__name__}: {err}")))
        return
    try:
        conn.send_bytes(command_encoder.encode(
            Described(runtime.info, runtime.advertised_side_channel, os.getpid())))
        serve_commands(conn, runtime.execute, command_decoder, command_encoder, runtime.idle)
    finally:
        runtime.close()
