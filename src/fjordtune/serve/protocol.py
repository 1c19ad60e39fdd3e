"""The part of OpenAI's chat-completions API that `fjordtune serve` speaks, and its errors.

Requests are checked here, before any token is generated, so a bad request costs no model time and
gets OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`) with a 4xx status that
says what to change. Fields OpenAI clients send by default (`user`, `logprobs: false`, ...) are
accepted; settings this server would otherwise silently ignore (`n` > 1, penalties, `logprobs`) are
refused instead, because a silent difference from what the client asked for is worse than an error.
Nothing here imports Ray, FastAPI or torch: the engine (`serve/engine.py`) and the HTTP layer
(`serve/app.py`) both use it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """`POST /v1/chat/completions`. Unknown extra fields are ignored, as OpenAI's own server does."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False

    def chat(self) -> list[dict[str, str]]:
        """The messages as a chat template takes them (OpenAI's `developer` role is the system role)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


@dataclass(frozen=True)
class Limits:
    """What one server grants a request."""

    max_tokens: int
    """The most new tokens per request (`--max-tokens`); a request asking for more gets a 400."""
    context_length: int
    """Prompt plus new tokens must fit the model's positions."""


def parse_chat_request(body: Any, *, served_model: str, limits: Limits) -> ChatRequest:
    """Validate a decoded JSON body; raise `ApiError` (400, or 404 for a model this server does not serve)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object with `model` and `messages`")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']} ({len(e.errors())} problem(s) in the request)",
                       param=where or None) from None
    if req.model != served_model:
        raise ApiError(404, f"The model `{req.model}` does not exist on this server; it serves `{served_model}` "
                       "(GET /v1/models)", param="model", code="model_not_found")
    if req.n != 1:
        raise ApiError(400, f"n={req.n}: this server returns one choice per request", param="n")
    if req.presence_penalty or req.frequency_penalty:
        raise ApiError(400, "presence_penalty and frequency_penalty are not supported; leave them at 0",
                       param="presence_penalty" if req.presence_penalty else "frequency_penalty")
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
    if len(req.stop_strings()) > 4:
        raise ApiError(400, "stop: at most 4 sequences", param="stop")
    wanted = requested_max_tokens(req)
    if wanted is not None and wanted > limits.max_tokens:
        param = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
        raise ApiError(400, f"{param}={wanted} is over this server's limit of {limits.max_tokens} new tokens per "
                       "request", param=param)
    return req


def requested_max_tokens(req: ChatRequest) -> int | None:
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def new_tokens_for(req: ChatRequest, *, prompt_tokens: int, limits: Limits) -> int:
    """How many tokens to generate at most: what was asked (default: up to the server's limit), after
    checking the prompt against the context length (400 `context_length_exceeded` when it does not fit)."""
    room = limits.context_length - prompt_tokens
    wanted = requested_max_tokens(req)
    if room < 1 or (wanted is not None and wanted > room):
        raise ApiError(400, f"This model's maximum context length is {limits.context_length} tokens; the messages "
                       f"take {prompt_tokens} and {wanted or 1} new token(s) were requested",
                       param="messages", code="context_length_exceeded")
    return min(wanted or limits.max_tokens, room)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(*, id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(*, id: str, model: str, created: int, delta: dict[str, Any] | None = None,
          finish_reason: str | None = None, usage_of: tuple[int, int] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; with `usage_of` the final usage-only chunk (`stream_options.include_usage`)."""
    out: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
    if usage_of is not None:
        out["choices"], out["usage"] = [], usage(*usage_of)
    else:
        out["choices"] = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def models_list(model: str, *, created: int, root: str) -> dict[str, Any]:
    """`GET /v1/models`."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "fjordtune",
                                        "root": root}]}
