"""Typed OpenAI request models for the proxied routes.

They validate what the gateway must understand (types, ranges, roles, content parts) and let
every other field through unchanged (``extra="allow"``), so vLLM's own extensions
(``top_k``, ``min_p``, ``vllm_xargs``, ``structured_outputs``...) reach the engine. Parameters the
engine cannot serve are refused with a 400 that names them.

Example:
    >>> req = ChatCompletionRequest.model_validate(
    ...     {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_k": 5})
    >>> req.messages[0].role, req.model_extra
    ('user', {'top_k': 5})
    >>> unsupported_param(req.model_dump(exclude_unset=True)) is None
    True
    >>> unsupported_param({"audio": {"voice": "alloy"}})
    'audio'
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Fields of the OpenAI API that vLLM 0.32 does not implement: refused, not silently ignored.
UNSUPPORTED_PARAMS: tuple[str, ...] = ("audio", "prediction", "web_search_options")
MAX_TOP_LOGPROBS = 20


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Open):
    data: str
    format: str


class AudioPart(_Open):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FilePart(_Open):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(_Open):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[
    TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")
]


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Open):
    """Any chat message: system, developer, user, assistant, tool (or legacy function)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class FunctionDef(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Open):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None


class _Sampling(_Open):
    """Fields shared by chat completions and completions."""

    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text", "audio"]] | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt_chars(self) -> int:
        total = 0
        for message in self.messages:
            if isinstance(message.content, str):
                total += len(message.content)
            elif message.content:
                total += sum(len(p.text) for p in message.content if isinstance(p, TextPart))
        return total


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_chars(self) -> int:
        if isinstance(self.prompt, str):
            return len(self.prompt)
        return sum(len(p) if isinstance(p, str | list) else 1 for p in self.prompt)


class ErrorObject(BaseModel):
    """The OpenAI error object every gateway error carries."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorObject


# OpenAPI description of the errors of the proxied routes (FastAPI's default 422 is never sent:
# invalid bodies get a 400 in this shape).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "Invalid request, unknown model, auth, rate limit"},
    "5XX": {"model": ErrorResponse, "description": "No engine available, engine error or timeout"},
}


def unsupported_param(body: dict[str, Any]) -> str | None:
    """The first parameter in ``body`` the engine cannot serve, or ``None``."""
    for name in UNSUPPORTED_PARAMS:
        if body.get(name) is not None:
            return name
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        return "modalities"
    if body.get("suffix"):
        return "suffix"
    best_of, n = body.get("best_of"), body.get("n") or 1
    if isinstance(best_of, int) and best_of != n:
        return "best_of"
    return None
