"""Chat messages to one prompt string: the model's own chat template (Jinja, from its
`tokenizer_config.json` or `chat_template.jinja`, as Hugging Face tokenizers carry it), or a plain
default for random-weight presets, which have no template.

Templates are rendered in Jinja's immutable sandbox: a template is data from a model directory,
and must not reach Python objects beyond the messages it is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from kvxfer.errors import ConfigError

# "role: content" lines, then the assistant's turn opened; what the random presets get.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class TemplateError(ConfigError):
    """A chat template that cannot be loaded, or refuses the messages it is given (a template's
    `raise_exception`, e.g. roles that do not alternate)."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    where: str  # for messages: the file it came from, or "plain default"
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` ({"role", "content"} each)."""
        from jinja2 import TemplateError as JinjaError

        try:
            return _compiled(self.source).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except JinjaError as err:
            raise TemplateError(f"chat template ({self.where}): {err}") from None


def load_chat_template(model_dir: Path | None) -> ChatTemplate:
    """The template of `model_dir` (chat_template.jinja wins over tokenizer_config.json's
    `chat_template`, as in transformers), or the plain default when it has none."""
    if model_dir is None:
        return ChatTemplate(PLAIN_TEMPLATE, "plain default")
    config = _tokenizer_config(model_dir / "tokenizer_config.json")
    tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.exists():
        return ChatTemplate(jinja_file.read_text(), str(jinja_file), **tokens)
    source = _default_template(config.get("chat_template"), model_dir / "tokenizer_config.json")
    if source is None:
        return ChatTemplate(PLAIN_TEMPLATE, "plain default", **tokens)
    return ChatTemplate(source, str(model_dir / "tokenizer_config.json"), **tokens)


def _tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TemplateError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(config, dict):
        raise TemplateError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _default_template(value: object, where: Path) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} of which "default" is used."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TemplateError(f"{where}: chat_template must be a string or a list with a 'default' entry")


def _token_text(value: object) -> str:
    """A special token as tokenizer_config.json writes it: text, or {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


@lru_cache(maxsize=8)  # one template per service; compiling costs milliseconds
def _compiled(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(source)
    except Exception as err:  # jinja2's TemplateSyntaxError, or worse for a malformed file
        raise TemplateError(f"chat template does not compile: {err}") from None


def _raise(message: str) -> None:
    from jinja2 import TemplateError as JinjaError

    raise JinjaError(message)
