"""The pure parts of the OpenAI front door, by table: stop strings over a growing token list,
error bodies naming the field, chat templates from a model directory, API keys from flags,
variables and files, and the request each backend kind's prefill gets."""

from __future__ import annotations

import argparse
import json

import msgspec
import pytest

from kvxfer.agents.messages import Binding
from kvxfer.daemons import api, chat
from kvxfer.daemons.auth import (
    ApiKeys,
    add_api_key_arguments,
    add_backend_key_arguments,
    api_keys_from_args,
    backend_key_from_args,
)
from kvxfer.daemons.backends import KvxferBackend, VllmBackend, decode_body
from kvxfer.daemons.chat_template import PLAIN_TEMPLATE, TemplateError, load_chat_template
from kvxfer.daemons.stop_text import StopText
from kvxfer.errors import ConfigError


def chars(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("text,stops,pieces,stopped", [
    ("hello", (), ["h", "e", "l", "l", "o"], False),
    ("abENDcd", ("END",), ["a", "b", "", "", ""], True),  # cut before the stop, nothing after
    ("aENxENDy", ("END",), ["a", "", "", "ENx", "", "", ""], True),  # "EN" held until it cannot be "END"
    ("ab\n\ncd", ("\n\n", "b"), ["a", ""], True),  # the earliest stop wins
    ("xyz", ("yzw",), ["x", "", ""], False),  # held to the end, released by flush
])
def test_stop_text(text, stops, pieces, stopped):
    stop = StopText(chars, stops)
    got = []
    for c in text:
        got.append(stop.push(ord(c)))
        if stop.stopped:
            break
    assert (got, stop.stopped) == (pieces, stopped)
    whole = "".join(got) + stop.flush()
    assert whole == (min((text[:text.find(s)] for s in stops if s in text), key=len) if stopped else text)


def test_stop_text_holds_an_incomplete_character():
    """A byte-level tokenizer decodes half a character as U+FFFD: not released until whole."""
    decode = lambda ids: bytes(ids).decode(errors="replace")  # noqa: E731
    stop = StopText(decode)
    assert [stop.push(b) for b in "é!".encode()] == ["", "é", "!"]


@pytest.mark.parametrize("body,param", [
    (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    (b'{"max_tokens": 3}', "prompt"),
    (b'{"prompt": "x", "stream_options": {"include_usage": "yes"}}', "stream_options.include_usage"),
    (b'{"prompt": "x", "stop": ["a", ""]}', "stop[1]"),
    (b'{"prompt": "x", "n": 3}', "n"),
    (b'{"prompt": [1, -2]}', "prompt[1]"),
    (b'not json', None),
])
def test_completion_errors_name_the_field(body, param):
    with pytest.raises(msgspec.ValidationError if param else msgspec.DecodeError) as err:
        api.decode_request(body)
    bad = api.invalid_field(err.value)
    assert (bad.type, bad.param) == (api.INVALID_REQUEST, param)


@pytest.mark.parametrize("body,param", [
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}', "messages[0].content[0].type"),
    (b'{"messages": [{"role": "user"}], "max_completion_tokens": 0}', "max_completion_tokens"),
    (b'{"messages": [{"content": "x"}]}', "messages[0].role"),
])
def test_chat_errors_name_the_field(body, param):
    with pytest.raises(msgspec.ValidationError) as err:
        chat.decode_request(body)
    assert api.invalid_field(err.value).param == param


def test_chat_becomes_a_completion_and_back():
    request = chat.decode_request(json.dumps({
        "model": "m", "max_tokens": 5, "max_completion_tokens": 7, "stop": "x", "stream": True,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
    }).encode())
    completion = chat.as_completion(request, load_chat_template(None))
    assert completion.prompt == "system: be brief\nuser: hi there\nassistant:"
    assert (completion.max_tokens, completion.stops, completion.stream, completion.model) == (7, ("x",), True, "m")
    answer = api.CompletionResponse(id="cmpl-abc", choices=[api.Choice(text="ok", token_ids=[1], finish_reason="stop")])
    whole = msgspec.to_builtins(chat.as_chat(answer, chunk=False))
    assert whole["id"] == "chatcmpl-abc" and whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    first = msgspec.to_builtins(chat.as_chat(answer, chunk=True, first=True))
    later = msgspec.to_builtins(chat.as_chat(answer, chunk=True))
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant", "content": "ok"}
    assert later["choices"][0]["delta"] == {"content": "ok"}


@pytest.mark.parametrize("files,want", [
    ({}, "user: hi\nassistant:"),
    ({"tokenizer_config.json": {"chat_template": "[{{ messages[0]['content'] }}]{{ eos_token }}", "eos_token": "</s>"}}, "[hi]</s>"),
    ({"tokenizer_config.json": {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
                                "bos_token": {"content": "<s>"}}}, "D"),
    ({"tokenizer_config.json": {"chat_template": "ignored"}, "chat_template.jinja": "J{{ bos_token }}"}, "J"),
])
def test_chat_template_comes_from_the_model_directory(tmp_path, files, want):
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    assert load_chat_template(tmp_path).render([{"role": "user", "content": "hi"}]) == want
    assert load_chat_template(None).source == PLAIN_TEMPLATE


@pytest.mark.parametrize("files,message", [
    ({"tokenizer_config.json": "{not json"}, "not readable JSON"),
    ({"tokenizer_config.json": {"chat_template": 3}}, "must be a string or a list"),
    ({"chat_template.jinja": "{% for %}"}, "does not compile"),
    ({"chat_template.jinja": "{{ raise_exception('roles must alternate') }}"}, "roles must alternate"),
    ({"chat_template.jinja": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}, "unsafe"),  # the sandbox
])
def test_bad_chat_templates_are_clear_errors(tmp_path, files, message):
    for name, content in files.items():
        (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(TemplateError, match=message):
        load_chat_template(tmp_path).render([{"role": "user", "content": "hi"}])


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_api_key_arguments(parser)
    add_backend_key_arguments(parser)
    return parser.parse_args(argv)


def test_api_keys_add_up_from_flag_variable_and_file(tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# rotated 2026-12\nfile-key-0001\n\n  file-key-0002  \n")
    keys = api_keys_from_args(parse(["--api-key", "flag-key-0001", "--api-key-file", str(keyfile)]),
                              {"KVXFER_API_KEY": "env-key-0001, env-key-0002"})
    for key in ("flag-key-0001", "env-key-0001", "env-key-0002", "file-key-0001", "file-key-0002"):
        assert keys.allows(f"Bearer {key}") and keys.allows(f"bearer {key}")
    for header in (None, "", "Bearer", "Bearer file-key-000", "Basic file-key-0001", "file-key-0001"):
        assert not keys.allows(header), header
    assert "key" not in repr(keys).replace("keys=", "") and "file-key" not in repr(keys)
    assert not ApiKeys().enabled and ApiKeys().allows(None)


@pytest.mark.parametrize("argv,env,message", [
    (["--api-key", "short"], {}, "--api-key: API key 0 has 5 characters; at least 8"),
    ([], {"KVXFER_API_KEY": "good-key-0001,b\u00e4d-key-0001"}, "KVXFER_API_KEY: API key 1 has .* outside printable ASCII"),
    (["--api-key-file", "/nonexistent/keys"], {}, "--api-key-file='/nonexistent/keys': cannot read"),
    ([], {"KVXFER_API_KEY_FILE": "/nonexistent/keys"}, "KVXFER_API_KEY_FILE='/nonexistent/keys'"),
])
def test_bad_api_keys_name_their_source_never_the_key(argv, env, message):
    with pytest.raises(ConfigError, match=message) as err:
        api_keys_from_args(parse(argv), env)
    assert "short" not in str(err.value) and "d-key-0001" not in str(err.value)


def test_backend_key_from_file_or_variable(tmp_path):
    keyfile = tmp_path / "backend"
    keyfile.write_text("backend-key-0001\n")
    assert backend_key_from_args(parse(["--backend-api-key-file", str(keyfile)]), {}) == "backend-key-0001"
    assert backend_key_from_args(parse([]), {"KVXFER_BACKEND_API_KEY": "backend-key-0002"}) == "backend-key-0002"
    assert backend_key_from_args(parse([]), {}) is None


def test_prefill_bodies_of_each_backend_kind():
    body = {"model": "m", "prompt": "p", "max_tokens": 9, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    vllm = VllmBackend().prefill_body(body, None)
    assert vllm == {"model": "m", "prompt": "p", "max_tokens": 1, "stream": False, "ignore_eos": True,
                    "kv_transfer_params": {"do_remote_decode": True}}
    chat_body = VllmBackend().prefill_body({"messages": [], "max_completion_tokens": 9}, None)
    assert chat_body["max_completion_tokens"] == 1 and chat_body["max_tokens"] == 1
    kvxfer = KvxferBackend().prefill_body(body, Binding(consumer_key="k" * 40))
    assert kvxfer["kvxfer_consumer"]["consumer_key"] == "k" * 40 and kvxfer["max_tokens"] == 9
    assert kvxfer["stream"] is False and "stream_options" not in kvxfer and kvxfer["kv_transfer_params"] is None
    assert decode_body(body, {"x": 1}) == {**body, "kv_transfer_params": {"x": 1}}
    assert body["max_tokens"] == 9 and body["stream"] is True  # the client's body is not changed
