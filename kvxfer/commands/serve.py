"""`kvxfer serve prefill|decode`: one service per TP group, one process per rank; rank 0 serves
HTTP (/v1/completions, /health, /ready, /metrics) and drives the others."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time

import uvicorn

from kvxfer.agents.messages import Role
from kvxfer.daemons.auth import NO_KEYS, ApiKeys, add_api_key_arguments, api_keys_from_args
from kvxfer.daemons.config import ServeConfig, add_serve_arguments, serve_config_from_args
from kvxfer.errors import KvxferError
from kvxfer.kernels import use_cache_dir

log = logging.getLogger("kvxfer.serve")
FATAL_EXIT_S = 5.0  # after a rank died: how long the service may take to stop before a hard exit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run a prefill or decode service (one process per TP rank)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(p)
    add_api_key_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = serve_config_from_args(args)
    if config.kernel_cache is not None:  # before any rank imports Triton or FlashInfer
        use_cache_dir(config.kernel_cache)
    return serve(config, log_level=args.log_level.upper(), api_keys=api_keys_from_args(args, os.environ))


def build_service(config: ServeConfig, *, log_level: str = "INFO"):
    from kvxfer.daemons.decode import DecodeService
    from kvxfer.daemons.prefill import PrefillService

    cls = PrefillService if config.role is Role.PREFILL else DecodeService
    return cls(config, log_level=log_level)


def serve(config: ServeConfig, *, log_level: str = "INFO", api_keys: ApiKeys = NO_KEYS) -> int:
    """Serve until SIGINT/SIGTERM. HTTP answers at once (/ready says 503 while ranks start);
    a service that cannot start exits with status 1."""
    from kvxfer.daemons.http import create_app

    service = build_service(config, log_level=log_level)
    server = uvicorn.Server(uvicorn.Config(create_app(service, api_keys=api_keys), host=config.host, port=config.port,
                                           log_level="warning", access_log=False))
    failed = threading.Event()

    def fatal() -> None:
        """A rank died: exit now. Requests in flight may wait on a collective with the dead rank
        (up to the group's timeout), and a graceful shutdown would wait for them, so the HTTP
        server does not wait, and a hard exit follows if the engine thread still holds on."""
        failed.set()
        server.should_exit = True
        server.force_exit = True
        threading.Thread(target=_exit_after, args=(service, FATAL_EXIT_S), name="kvxfer-fatal-exit",
                         daemon=True).start()

    service.on_fatal = fatal

    def start() -> None:
        try:
            service.start()
        except KvxferError:
            failed.set()
            server.should_exit = True
        except Exception:
            log.exception("service failed to start")
            failed.set()
            server.should_exit = True

    threading.Thread(target=start, name="kvxfer-start", daemon=True).start()
    log.info("%s service %s: HTTP on http://%s:%d, side channel base port %d", config.role.value,
             config.engine_id, config.host, config.port, config.side_channel_port)
    try:
        server.run()
    finally:
        service.close()
    return 1 if failed.is_set() else 0


def _exit_after(service, seconds: float) -> None:
    """The last resort of a service whose rank died: kill the remaining ranks, exit with 1."""
    time.sleep(seconds)
    log.error("service did not stop %.0f s after a rank died (a request waits on the dead rank); "
              "exiting hard", seconds)
    service.bus.kill()
    logging.shutdown()
    os._exit(1)
