"""`kvxfer proxy`: the OpenAI-compatible front door: prefill, then decode with the returned
transfer parameters; balances over several services of each kind."""

from __future__ import annotations

import argparse

import uvicorn

from kvxfer.daemons.config import add_proxy_arguments, proxy_config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proxy", help="run the OpenAI-compatible proxy in front of prefill and decode services",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_proxy_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvxfer.daemons.proxy import Proxy, create_app

    config = proxy_config_from_args(args)
    proxy = Proxy(prefill_urls=list(config.prefill_urls), decode_urls=list(config.decode_urls),
                  request_timeout_s=config.request_timeout_s, retry_policy=config.retry_policy)
    uvicorn.run(create_app(proxy), host=config.host, port=config.port, log_level="warning", access_log=False)
    return 0
