"""HTTP bodies are JSON, whose integers have no bound; everything that reaches the command bus
(msgpack: 64-bit integers) or the engine (seed arithmetic) must be bounded at decode time, so a
huge value is a 400 naming its field, not a crash (found by tests/test_api_fuzz.py)."""

from __future__ import annotations

import msgspec
import pytest

from kvxfer.agents import messages as m
from kvxfer.daemons import api

PARAMS = {"engine_id": "prefill0", "boot_epoch": 1, "request_id": "r" * 32, "block_ids": [1],
          "side_channel": "tcp://127.0.0.1:5600", "tp_size": 1, "num_tokens": 3, "first_token_id": 5}


@pytest.mark.parametrize("body, where", [
    ({"prompt": "x", "seed": 2**64}, "$.seed"),
    ({"prompt": "x", "seed": 2**40}, "$.seed"),
    ({"prompt": "x", "seed": -1}, "$.seed"),
    ({"prompt": "x", "kv_transfer_params": {**PARAMS, "protocol_version": 2**64}}, "$.kv_transfer_params.protocol_version"),
    ({"prompt": "x", "kv_transfer_params": {**PARAMS, "protocol_version": -1}}, "$.kv_transfer_params.protocol_version"),
])
def test_huge_integers_are_refused_naming_the_field(body, where):
    with pytest.raises(msgspec.ValidationError, match=rf"at `{where.replace('$', '[$]')}`"):
        api.decode_request(msgspec.json.encode(body))


def test_bounded_values_still_decode():
    request = api.decode_request(msgspec.json.encode({"prompt": "x", "seed": 2**32 - 1,
                                                      "kv_transfer_params": PARAMS}))
    assert request.seed == 2**32 - 1 and request.kv_transfer_params.protocol_version == m.PROTOCOL_VERSION
