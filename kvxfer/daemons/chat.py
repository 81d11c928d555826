"""`/v1/chat/completions` on top of completions: the request's messages become one prompt
through the model's chat template, the completion path generates, and its answers (whole, or
stream chunks) are re-shaped as chat answers. The services do this; the proxy forwards chat
requests as they are (a vLLM backend applies its own template).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

import msgspec

from kvxfer.daemons import api
from kvxfer.daemons.chat_template import ChatTemplate

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(msgspec.Struct, kw_only=True, tag="text", tag_field="type", forbid_unknown_fields=False):
    text: str


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    role: Role
    content: str | list[TextPart] | None = None  # only text parts: there is no image input
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatRequest(api.Generation, kw_only=True, forbid_unknown_fields=False):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1, max_length=4096)]
    max_completion_tokens: api.MaxTokens | None = None  # OpenAI's newer name; wins over max_tokens
    add_generation_prompt: bool = True


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None  # set in the first stream chunk and in a whole answer
    content: str | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: ChatMessage
    token_ids: list[int] = []
    finish_reason: str | None = None
    logprobs: None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: ChatMessage
    token_ids: list[int] = []
    finish_reason: str | None = None
    logprobs: None = None


class ChatResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    model: str = ""
    choices: list[ChatChoice] | list[ChunkChoice]
    usage: api.Usage | None = None
    kv_transfer_params: api.TransferParams | None = None
    kvxfer: api.TransferStats | None = None


_decoder = msgspec.json.Decoder(ChatRequest)


def decode_request(body: bytes) -> ChatRequest:
    return _decoder.decode(body)


def as_completion(request: ChatRequest, template: ChatTemplate) -> api.CompletionRequest:
    """The completion request that generates `request`'s answer (raises TemplateError)."""
    messages = [{"role": m.role, "content": m.text} for m in request.messages]
    prompt = template.render(messages, add_generation_prompt=request.add_generation_prompt)
    shared = {f: getattr(request, f) for f in api.Generation.__struct_fields__}
    if request.max_completion_tokens is not None:
        shared["max_tokens"] = request.max_completion_tokens
    return api.CompletionRequest(prompt=prompt, **shared)


def as_chat(response: api.CompletionResponse, *, chunk: bool, first: bool = False) -> ChatResponse:
    """A completion answer (or stream chunk) as the chat answer (or chunk) it stands for."""
    if chunk:
        choices = [ChunkChoice(index=c.index, token_ids=c.token_ids, finish_reason=c.finish_reason,
                               delta=ChatMessage(role="assistant" if first else None, content=c.text))
                   for c in response.choices]
    else:
        choices = [ChatChoice(index=c.index, token_ids=c.token_ids, finish_reason=c.finish_reason,
                              message=ChatMessage(role="assistant", content=c.text))
                   for c in response.choices]
    return ChatResponse(id="chatcmpl-" + response.id.removeprefix("cmpl-"),
                        object="chat.completion.chunk" if chunk else "chat.completion",
                        created=response.created, model=response.model, choices=choices,
                        usage=response.usage, kv_transfer_params=response.kv_transfer_params,
                        kvxfer=response.kvxfer)
