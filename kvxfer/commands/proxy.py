"""`kvxfer proxy`: the OpenAI-compatible front door (/v1/models, /v1/completions,
/v1/chat/completions): prefill, then decode with the returned transfer parameters; balances over
several servers of each pool. The servers are kvxfer services (`kvxfer serve`) or, with
`--backend vllm`, vLLM OpenAI servers running KvxferConnector.

Clients use any OpenAI client: `OpenAI(base_url="http://HOST:8000/v1", api_key=KEY)`."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from kvxfer.daemons.auth import (
    add_api_key_arguments,
    add_backend_key_arguments,
    api_keys_from_args,
    backend_key_from_args,
)
from kvxfer.daemons.backends import add_backend_arguments, backend_kind_from_args
from kvxfer.daemons.config import add_proxy_arguments, proxy_config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proxy", help="run the OpenAI-compatible proxy in front of prefill and decode servers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_proxy_arguments(p)
    add_backend_arguments(p)
    add_backend_key_arguments(p)
    add_api_key_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvxfer.daemons.proxy import Proxy, create_app

    config = proxy_config_from_args(args)
    # httpx logs every request at INFO: the health checks alone would be two lines a second
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    proxy = Proxy(prefill_urls=list(config.prefill_urls), decode_urls=list(config.decode_urls),
                  request_timeout_s=config.request_timeout_s, retry_policy=config.retry_policy,
                  backend=backend_kind_from_args(args, os.environ),
                  backend_api_key=backend_key_from_args(args, os.environ), rehearse=config.rehearse)
    app = create_app(proxy, api_keys=api_keys_from_args(args, os.environ))
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)
    return 0
