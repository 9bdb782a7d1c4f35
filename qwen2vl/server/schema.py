"""The OpenAI chat-completions request, as pydantic models (validation errors become 400s in OpenAI's format)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class URL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    """OpenAI's text / image_url parts, plus video_url and qwen-vl-utils' image / video parts. Per-part media
    options (min_pixels, max_pixels, fps, nframes, ...) pass through as extra fields."""
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url", "video_url", "image", "video"]
    text: str | None = None
    image_url: URL | str | None = None
    video_url: URL | str | None = None
    image: str | None = None
    video: str | list[str] | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM's extension: stop tokens are masked before this many
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # extensions: the image budget for this request
    min_pixels: int | None = Field(default=None, ge=1)
    max_pixels: int | None = Field(default=None, ge=1)
