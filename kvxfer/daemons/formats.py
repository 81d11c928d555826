"""The two OpenAI request shapes a service answers, as one interface over the completion path:
`/v1/completions` as it is, `/v1/chat/completions` through the chat template. Each turns a body
into a `CompletionRequest` and a completion answer (or stream chunk) back into its own shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from kvxfer.daemons import api, chat
from kvxfer.daemons.chat_template import ChatTemplate


class CompletionsFormat:
    path = "/v1/completions"

    def decode(self, body: bytes) -> api.CompletionRequest:
        return api.decode_request(body)

    def whole(self, response: api.CompletionResponse) -> msgspec.Struct:
        return response

    def chunk(self, response: api.CompletionResponse, *, first: bool) -> msgspec.Struct:
        return response


@dataclass(frozen=True)
class ChatFormat:
    template: ChatTemplate
    path = "/v1/chat/completions"

    def decode(self, body: bytes) -> api.CompletionRequest:
        """Raises msgspec errors for a malformed body, TemplateError for messages the template
        refuses."""
        return chat.as_completion(chat.decode_request(body), self.template)

    def whole(self, response: api.CompletionResponse) -> msgspec.Struct:
        return chat.as_chat(response, chunk=False)

    def chunk(self, response: api.CompletionResponse, *, first: bool) -> msgspec.Struct:
        return chat.as_chat(response, chunk=True, first=first)


Format = CompletionsFormat | ChatFormat
