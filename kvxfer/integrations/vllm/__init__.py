"""kvxfer as a vLLM KV connector: `KvxferConnector` (see README.md beside this file).

vLLM is imported only when the connector class is asked for, so `kvxfer.integrations.vllm.testing`
imports without vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvxferConnector"]


def __getattr__(name: str) -> Any:
    if name == "KvxferConnector":
        from kvxfer.integrations.vllm.connector import KvxferConnector

        return KvxferConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
