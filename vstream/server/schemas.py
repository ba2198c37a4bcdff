"""Wire schemas of the HTTP API: request bodies (validated by pydantic) and the OpenAI-shaped error object.

This module holds shapes only: it opens no source, touches no model and knows nothing about routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vstream.engine.watches import ESCALATE_MARGIN


class FileSpec(BaseModel):
    """A video file, given relative to the server's media root."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["file"]  # the kind of source
    path: str = Field(min_length=1, max_length=4096, description="the file's path relative to the media root "
                      "(it must resolve inside it, links included)")


class UrlSpec(BaseModel):
    """A network stream (http, https, rtsp) that the server pulls."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["url"]  # the kind of source
    url: str = Field(min_length=1, max_length=4096, description="http, https or rtsp; a private or loopback address "
                     "only if the server allows private sources")


class PushSpec(BaseModel):
    """Frames pushed by the client over `WS /v1/realtime?stream_id=...`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["push"]  # the kind of source


class WebcamSpec(BaseModel):
    """A V4L2 capture device on the server (`/dev/video<device>`)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["webcam"]  # the kind of source
    device: int = Field(default=0, ge=0, le=63, description="the N of /dev/videoN")


SourceSpec = Annotated[FileSpec | UrlSpec | PushSpec | WebcamSpec, Field(discriminator="type")]


class StreamCreate(BaseModel):
    """Body of `POST /v1/streams`."""

    model_config = ConfigDict(extra="forbid")
    source: SourceSpec  # what the stream reads: a file, a URL, pushed frames or a webcam
    speed: float | None = Field(default=None, gt=0, le=1000, allow_inf_nan=False,
                                description="replay a file at this speed (live); null: as fast as it decodes")
    fps: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                              description="frames sampled per second of stream time (null: the model's rate); at most "
                              "the server's max_fps (the schema's maximum)")


class ChatMessage(BaseModel):
    """One chat message; `content` is a string or a list of OpenAI content parts (only text parts are read)."""

    model_config = ConfigDict(extra="allow")
    role: str  # "user", "system", "assistant": the question is the last "user" message's text
    content: str | list[dict[str, Any]] | None = None  # text, or OpenAI content parts ({"type": "text", "text": ...})


class ChatRequest(BaseModel):
    """Body of `POST /v1/chat/completions`: OpenAI fields that vstream reads, plus the `stream_id` extension.

    Unknown OpenAI fields (temperature, top_p, ...) are accepted and ignored, as OpenAI-compatible servers do.
    """

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(default=None, description="the stream to answer from (its id, as OpenAI clients send a "
                              "model name) when `stream_id` is not given")
    stream_id: str | None = Field(default=None, description="the stream to answer from (a vstream extension; wins "
                                  "over `model`)")
    messages: list[ChatMessage] | None = Field(default=None, max_length=256, description="the question is the text of "
                                               "the last user message")
    stream: bool = Field(default=False, description="answer as server-sent events, piece by piece, then [DONE]")
    max_tokens: int | None = Field(default=None, ge=1, description="most tokens in the answer (null: the model's "
                                   "default); at most the server's limit")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the newer OpenAI name of max_tokens "
                                              "(wins when both are given)")
    as_of: float | None = Field(default=None, ge=0, allow_inf_nan=False,
                                description="answer from the memory as it stood at this stream time (seconds; a "
                                "vstream extension)")


class WatchCreate(BaseModel):
    """Body of `POST /v1/streams/{id}/watches`: a standing question on the stream."""

    model_config = ConfigDict(extra="forbid")
    condition: str = Field(min_length=1, max_length=500, description="what to watch for, e.g. 'a purple square "
                           "appears' (asked as a yes/no question of the memory)")
    every_s: float = Field(default=1.0, ge=0.1, le=3600, allow_inf_nan=False,
                           description="evaluate at most once per this many seconds of stream time")
    cooldown_s: float = Field(default=10.0, ge=0, le=86400, allow_inf_nan=False,
                              description="no event within this many seconds of stream time of the last one")
    threshold: float = Field(default=0.0, ge=-1e12, le=1e12, allow_inf_nan=False,
                             description="log-odds of yes against no above which the watch triggers; for testing "
                             "and calibration (a very low value fires at the first evaluation)")
    hysteresis: float = Field(default=0.5, ge=0, le=1e6, allow_inf_nan=False,
                              description="triggers above threshold + hysteresis, clears below threshold - hysteresis")
    escalate_margin: float | None = Field(
        default=ESCALATE_MARGIN, ge=0, le=1e6, allow_inf_nan=False,
        description="score the memory's recent part (the newest frames) first, and the whole memory only when that "
        "score lies within this many log-odds of [threshold - hysteresis, threshold + hysteresis]; null: always the "
        "whole memory")
    webhook: str | None = Field(default=None, min_length=1, max_length=2000,
                                description="an http(s) URL each event of the watch is POSTed to, signed (README, "
                                "Webhooks); private addresses only if the server allows private sources")


class ErrorObject(BaseModel):
    """The OpenAI error object: what went wrong, its kind, the field at fault and a stable code."""

    message: str
    """What went wrong, naming what was expected and what came."""
    type: str
    """Its kind, as OpenAI names them: invalid_request_error, authentication_error, rate_limit_error, ..."""
    param: str | None
    """The request field at fault, if one is."""
    code: str | None
    """A stable machine-readable code (e.g. stream_not_found, too_many_streams)."""


class ErrorResponse(BaseModel):
    """Body of every error answer."""

    error: ErrorObject  # what went wrong (OpenAI's shape)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
