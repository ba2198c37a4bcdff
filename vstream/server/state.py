"""What the server keeps between requests: its limits, the open streams and its counters, and the bookkeeping of
opening and closing a stream (slots, registration).

Nothing here touches the network or runs model code: a stream's session reads and ingests on its own thread and the
engine's. Every structure is bounded: streams by `max_streams`, thumbnails by a ring per stream (`thumbnails`),
latency histograms by their buckets (`metrics`).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vstream.engine import StreamSession
from vstream.server.errors import ApiError
from vstream.server.metrics import TTFT_BUCKETS, Histogram
from vstream.server.thumbnails import Thumbnails
from vstream.server.watches import WatchBoard, Watcher
from vstream.sources import PushSource
from vstream.stats import RecentValues

TTFT_WINDOW_S = 60.0
"""The window of `ServerState.recent_ttft`."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a client may ask of the server; each one, when exceeded, gives an error that names it."""

    max_body_bytes: int = 1 << 20
    """Largest HTTP request body (413 above it)."""
    max_ws_message_bytes: int = 8 << 20
    """Largest WebSocket message (the socket is closed with 1009 above it)."""
    max_frame_pixels: int = 3840 * 2160
    """Most pixels in one frame, pushed or decoded; checked from the header, before the pixels are allocated."""
    max_source_seconds: float = 4 * 3600.0
    """Longest file (by its header) and the most stream time read from any pulled source."""
    max_source_frames: int = 1_000_000
    """Most frames a file may declare (decoding walks every one of them, sampled or not)."""
    max_source_bytes: int = 16 << 30
    """Most bytes an HTTP(S) source may declare (Content-Length or Content-Range); undeclared sizes and live streams
    are bounded by max_source_seconds."""
    max_question_chars: int = 4000
    """Longest question."""
    max_answer_tokens: int = 1024
    """Most tokens one answer may ask for (`max_tokens`)."""
    max_running: int = 64
    """Most answers generated or waiting at once over the whole server (429 above it); the engine decodes up to 32
    of them in one batch, the others wait for a slot."""
    max_fps: float = 30.0
    """Highest target sampling rate of a stream."""
    ws_idle_s: float = 300.0
    """A WebSocket session with no message for this long is closed (after a `session.closing` notice)."""
    ws_notice_s: float = 10.0
    """How long before closing a session (idle, drain, its stream moved away) the notice is sent."""
    move_held_frames: int = 32
    """Frames a cluster's ingress holds per socket while its stream moves (at most this many times
    max_ws_message_bytes); beyond it the oldest is dropped, counted and answered with an error event."""
    url_timeout_s: float = 5.0
    """Each network wait of a URL source (connect, read), and of the redirect checks."""
    thumbnails: int = 512
    """Most key-frame thumbnails kept per stream (the newest; at least the memory buffer's length is useful)."""
    max_watches_per_stream: int = 8
    """Most watches (standing questions) on one stream (429 above it)."""
    max_watches: int = 256
    """Most watches over all the server's streams (429 above it)."""
    webhook_attempts: int = 5
    """Most attempts to deliver one event to a webhook (connection failures, timeouts, 408, 429 and 5xx are retried)."""
    webhook_backoff_s: float = 1.0
    """Wait before the first webhook retry; it doubles with each further one."""
    snapshot_history: int = 32
    """Past memory snapshots kept per stream for questions "as of" an earlier time."""
    max_frame_time_s: float = 1e9
    """Latest stream time (seconds, about 31 years) that a pushed frame may carry: far past any stream, and low
    enough that every sampling slot is an exact integer."""


@dataclass
class Stream:
    """One open stream: its session, what it was created from, and the state of its push transport (if any)."""

    id: str  # "str_" and 16 hex digits
    session: StreamSession  # its lane of the engine, fed by its reader
    source: dict  # the source spec it was created from, as the client sent it (what a durable stream reopens)
    created: float  # Unix time of its creation
    fps: float  # frames sampled per second of stream time
    thumbnails: Thumbnails  # the newest frames as small JPEGs, for the page and watch events
    push: PushSource | None = None  # the push transport's queue (a push stream), else None
    owner: str | None = None  # the WebSocket session that created it, deleted with it
    speed: float | None = None  # a file replayed at this speed (live), as created
    pushed: int = 0  # frames received on the push transport
    sampled_out: int = 0  # pushed frames skipped because they came faster than `fps`
    next_slot: int = 0  # the next sampling slot (floor(t * fps)) a pushed frame may fill
    last_time: float = float("-inf")  # time of the last pushed frame (times must increase)
    clock0: float | None = None  # monotonic time of the first binary frame (binary frames carry no time)
    push_lock: threading.Lock = field(default_factory=threading.Lock)  # one pushed frame at a time is sampled
    board: WatchBoard = field(default_factory=WatchBoard)  # its watches and their event feed

    def counts(self) -> dict:
        """Running counts for frame acknowledgements: frames received, ingested (in the memory) and dropped."""
        c = self.session.counters
        rejected = self.push.rejected if self.push is not None else 0
        return {"received": self.pushed if self.push is not None else c.received, "ingested": c.encoded,
                "dropped": c.dropped + rejected + self.sampled_out}

    def close(self) -> None:
        """Close the push transport (if any), then the session; blocks until its threads end (never on the loop)."""
        if self.push is not None:
            self.push.close()
        self.session.close()


@dataclass
class ServerState:
    """Everything one server process shares between its routes, its realtime sockets and its threads."""

    model: object  # the loaded model (`vstream.load`), whose engine answers every stream
    media_root: Path | None
    """The directory file sources are read from (None: file sources are refused)."""
    api_key: str | None
    """The key every request must carry (Authorization: Bearer), or the page's cookie; None: no key asked."""
    max_streams: int  # streams open at once; one more is refused with 429
    limits: Limits = field(default_factory=Limits)  # every bound on what clients may ask (see `Limits`)
    allow_private_sources: bool = False  # URL sources and webhooks may name private and loopback addresses
    allowed_hosts: frozenset[str] | None = None
    """Host names (lower case, IPv6 without brackets) that requests may name in `Host`; None: any."""
    streams: dict[str, Stream] = field(default_factory=dict)  # open streams by id
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards `streams`, `running` and `pending`
    running: int = 0  # answers running or waiting now (at most `limits.max_running`; more are refused with 429)
    pending: int = 0  # stream slots reserved by requests still opening their source
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))  # every answer's, for /metrics
    recent_ttft: RecentValues = field(default_factory=lambda: RecentValues(TTFT_WINDOW_S))
    """Times to first token of the last `TTFT_WINDOW_S` seconds (what a cluster's autoscaler reads)."""
    ready: bool = False  # the warm-up has run: /health/ready answers 200
    warmup_s: float = 0.0
    """Seconds the start-up warm-up answer took (readiness waits for it)."""
    memory_page: int | None = None
    """Streams per memory page of the engine (`EngineConfig.memory_page`); None: the engine's default."""
    draining: bool = False  # SIGTERM came: not ready, new streams and questions refused, sessions told
    drain_deadline: float | None = None  # monotonic time at which sessions are closed
    cookies: object = None
    """The page's session tokens (`vstream.server.cookies.PageCookies`), made by `create_app`."""
    sockets: set = field(default_factory=set)  # open realtime sessions (objects with `notify_closing`)
    answers_cancelled: int = 0  # answers stopped before their end: client gone or cancelled (a /metrics counter)
    engine: object = None
    """The model's engine (`vstream.engine.Engine`), made by the start-up warm-up."""
    durable: object = None
    """The state directory (`vstream.server.durable.Durable`) with `--state-dir`, else None."""
    watcher: object = None
    """The thread that evaluates watches (`vstream.server.watches.Watcher`), started with the first watch."""
    webhooks: object = None
    """The webhook deliveries (`vstream.server.webhooks.WebhookSender`) when the server has a webhook secret."""

    def get(self, stream_id: str, param: str = "model") -> Stream:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise ApiError(404, f"no stream with id {stream_id!r}: expected one of the ids from GET /v1/streams",
                           code="stream_not_found", param=param)
        return stream

    def public_text(self, text: str) -> str:
        """`text` (a stream's error, say) with the media root's absolute path cut off, so that a file is named as
        the client named it."""
        if self.media_root is None:
            return text
        for root in {str(self.media_root), str(self.media_root.resolve())}:
            text = text.replace(root.rstrip("/") + "/", "")
        return text

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise ApiError(503, "the server is draining: it takes no new streams, sessions or questions",
                           code="draining", retry_after=5)

    def reserve_slot(self) -> None:
        """Hold a stream slot while a request opens its source; 429 when `max_streams` are open or being opened."""
        self.refuse_if_draining()
        with self.lock:
            if len(self.streams) + self.pending >= self.max_streams:
                raise ApiError(429, f"too many streams: {len(self.streams)} open, at most max_streams="
                               f"{self.max_streams}; DELETE one first", code="too_many_streams", retry_after=5)
            self.pending += 1

    def release_slot(self) -> None:
        with self.lock:
            self.pending -= 1

    def start_stream(self, frames, live: bool, push: PushSource | None, source: dict, fps: float,
                     owner: str | None = None, *, speed: float | None = None, stream_id: str | None = None,
                     created: float | None = None, memory_state: dict | None = None) -> Stream:
        """Register a stream (the caller holds a reserved slot) and start its session; a restored stream comes with
        its `stream_id`, `created` time and `memory_state` (`Lane.load_state_dict`), loaded before any frame."""
        thumbnails = Thumbnails(self.limits.thumbnails)
        session = StreamSession(self.model, history=self.limits.snapshot_history, on_frames=thumbnails.add,
                                engine=self.engine)
        if memory_state is not None:
            try:
                session.lane.load_state_dict(memory_state)
            except BaseException:
                session.close()
                raise
        stream_id = stream_id or "str_" + secrets.token_hex(8)
        stream = Stream(stream_id, session, source, created or time.time(), fps, thumbnails, push, owner, speed=speed)
        session.start(frames, live=live)
        with self.lock:
            self.streams[stream_id] = stream
        return stream

    def start_watcher(self) -> None:
        """Start the thread that evaluates watches, unless it runs already."""
        with self.lock:
            if self.watcher is None:
                self.watcher = Watcher(self)

    def begin_answer(self) -> None:
        """Count an answer as running; 429 when `max_running` are already running."""
        self.refuse_if_draining()
        with self.lock:
            if self.running >= self.limits.max_running:
                raise ApiError(429, f"too many answers running: {self.running}, at most max_running="
                               f"{self.limits.max_running}; retry shortly", code="too_many_requests", retry_after=1)
            self.running += 1

    def end_answer(self) -> None:
        with self.lock:
            self.running -= 1

    def time_left(self) -> float | None:
        return None if self.drain_deadline is None else max(0.0, self.drain_deadline - time.monotonic())
