"""msgspec Structs for the few request fields the router reads. The raw body is forwarded."""

from __future__ import annotations

from typing import Any

import msgspec

# Fields that could name an upstream host: dropped before forwarding.
HOST_FIELDS = frozenset({"base_url", "api_base", "api_url", "url", "endpoint", "host", "hostname",
                         "server_url", "upstream", "upstream_url", "proxy", "proxy_url", "callback_url",
                         "webhook_url"})


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class Message(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


class _Common(msgspec.Struct):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatRequest(_Common):
    messages: list[Message] = msgspec.field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True


class CompletionRequest(_Common):
    prompt: str | list[str | int] = ""


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: dict[str, Any] | None = None

    @property
    def cached_tokens(self) -> int:
        d = self.prompt_tokens_details or {}
        v = d.get("cached_tokens")
        return v if isinstance(v, int) else 0


class UsageEnvelope(msgspec.Struct):
    usage: Usage | None = None
