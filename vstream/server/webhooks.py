"""Webhook deliveries of watch events: each event of a watch that names a `webhook` is POSTed there as JSON by a
background worker, signed, and retried with exponential backoff; nothing here runs on the engine thread or the event
loop, and a slow or failing receiver delays nothing but its own deliveries.

- URL rules (the sources', from `netsafe`): an ASCII http or https URL that every reader parses alike, with no user
  name or password in it, whose host resolves only to public addresses unless the server allows private sources.
  `check_webhook` applies them when the watch is created (400); every attempt applies them again on a connection
  dialled to the address it checked, so a later DNS answer cannot move a delivery onto a private address. Redirects
  are refused, not followed: a 3xx answer is a failed delivery.
- Body: the event as the SSE feed carries it (`id`, `type`, `watch_id`, `stream_id`, `stream_time`, `score`, the times
  it rests on, `created`: Unix time of the event), compact JSON, the same bytes on every attempt.
- Headers: `X-Vstream-Signature: sha256=<hex>`, the HMAC-SHA256 of the raw body under the server's webhook secret
  (`vstream serve --webhook-secret`); `X-Vstream-Event` (the event type) and `X-Vstream-Delivery`
  (`<stream id>/<event id>`, the same on every attempt, so a receiver can drop a repeat). To verify, compute
  `hmac.new(secret, body, "sha256").hexdigest()` over the bytes received and compare it with
  `hmac.compare_digest`; reject events whose `created` is too old to stop replays.
- Retries: a connection failure, a timeout, 408, 429 or 5xx is retried, up to `attempts` attempts in all, the n-th
  retry waiting `backoff_s * 2**(n-1)` seconds (at most `MAX_BACKOFF_S`); any other answer ends the delivery (2xx
  delivered, others failed). At most `max_pending` deliveries wait at once; a new one beyond that drops the oldest
  (counted in `dropped`, logged).

What this module does not do: keep deliveries across a restart (pending ones are lost), or promise order: a retried
event may arrive after a later one (receivers order by `id`).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpcore

from vstream.server.netsafe import CheckedBackend, UnsafeUrl, ascii_url, parse, resolve_checked

SIGNATURE_HEADER = "X-Vstream-Signature"
MAX_BACKOFF_S = 300.0
RETRIED_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
log = logging.getLogger("vstream.server.webhooks")


def check_webhook(url: str, allow_private) -> str:
    """The webhook URL, ASCII, after the URL rules above (its host resolved and checked); raises UnsafeUrl."""
    url = ascii_url(url)
    scheme, host, port = parse(url)
    if scheme not in ("http", "https"):
        raise UnsafeUrl(f"a webhook must be an http or https URL, got scheme {scheme!r}", code="invalid_url")
    if "@" in urlsplit(url).netloc:
        raise UnsafeUrl("a webhook URL must not carry a user name or password: the server signs each delivery "
                        f"instead (header {SIGNATURE_HEADER})", code="invalid_url")
    resolve_checked(host, port, allow_private)
    return url


def sign(secret: bytes, body: bytes) -> str:
    """The value of the signature header for `body`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def backoff(retry: int, base_s: float) -> float:
    """Seconds to wait before the `retry`-th retry (1, 2, ...)."""
    return min(MAX_BACKOFF_S, base_s * 2 ** (retry - 1))


@dataclass(order=True)
class Delivery:
    """One event on its way to one URL; ordered by when its next attempt is due."""

    due: float
    seq: int
    url: str = field(compare=False)
    body: bytes = field(compare=False)
    headers: list[tuple[bytes, bytes]] = field(compare=False)
    done: Callable[[bool], None] | None = field(compare=False, default=None)
    attempts: int = field(compare=False, default=0)


class WebhookSender:
    """Worker threads that deliver events to webhooks (see the module docstring). Thread-safe; workers start with
    the first delivery."""

    def __init__(self, secret: bytes, allow_private, timeout_s: float = 5.0, attempts: int = 5,
                 backoff_s: float = 1.0, workers: int = 4, max_pending: int = 1024):
        if not secret:
            raise ValueError("a webhook sender needs a non-empty secret to sign with")
        if attempts < 1 or not backoff_s > 0 or workers < 1 or max_pending < 1:
            raise ValueError(f"expected attempts >= 1, backoff_s > 0, workers >= 1, max_pending >= 1, got "
                             f"{attempts}, {backoff_s}, {workers}, {max_pending}")
        self.secret, self.allow_private, self.timeout_s = secret, allow_private, timeout_s
        self.attempts, self.backoff_s, self.max_pending = attempts, backoff_s, max_pending
        self.delivered = self.failed = self.dropped = 0
        self._heap: list[Delivery] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._workers = [threading.Thread(target=self._run, name=f"vstream-webhook-{i}", daemon=True)
                         for i in range(workers)]
        self._started = False

    def submit(self, url: str, event: dict, done: Callable[[bool], None] | None = None) -> None:
        """Queue `event` for `url`; `done(delivered)` is called on a worker once it is delivered or given up.
        Never blocks on the network."""
        body = json.dumps(event, separators=(",", ":"), allow_nan=False).encode()
        headers = [(b"Content-Type", b"application/json"), (b"User-Agent", b"vstream-webhook"),
                   (SIGNATURE_HEADER.encode(), sign(self.secret, body).encode()),
                   (b"X-Vstream-Event", str(event.get("type", "")).encode()),
                   (b"X-Vstream-Delivery", f"{event.get('stream_id', '')}/{event.get('id', '')}".encode())]
        with self._cond:
            if self._stopping:
                return
            if not self._started:
                self._started = True
                for worker in self._workers:
                    worker.start()
            if len(self._heap) >= self.max_pending:
                self._drop_oldest()
            heapq.heappush(self._heap, Delivery(time.monotonic(), next(self._seq), url, body, headers, done))
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._heap)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers (an attempt in flight ends within its timeout); pending deliveries are dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            if worker.is_alive():
                worker.join(max(0.0, deadline - time.monotonic()))

    def _drop_oldest(self) -> None:
        oldest = min(self._heap, key=lambda d: d.seq)
        self._heap.remove(oldest)
        heapq.heapify(self._heap)
        self.dropped += 1
        log.warning("webhook queue full (%d pending): dropped the oldest delivery, to %s", self.max_pending,
                    oldest.url)

    def _next(self) -> Delivery | None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                if self._heap and self._heap[0].due <= now:
                    return heapq.heappop(self._heap)
                self._cond.wait(None if not self._heap else self._heap[0].due - now)
        return None

    def _run(self) -> None:
        while (delivery := self._next()) is not None:
            delivery.attempts += 1
            try:
                outcome = self._attempt(delivery)
            except Exception:  # an error no check expected ends this delivery, not the worker  # noqa: BLE001
                log.exception("webhook delivery to %s failed unexpectedly", delivery.url)
                outcome = "fail"
            if outcome == "retry" and delivery.attempts < self.attempts:
                delivery.due = time.monotonic() + backoff(delivery.attempts, self.backoff_s)
                with self._cond:
                    heapq.heappush(self._heap, delivery)
                    self._cond.notify()
                continue
            self._finish(delivery, outcome == "ok")

    def _finish(self, delivery: Delivery, ok: bool) -> None:
        with self._cond:
            if ok:
                self.delivered += 1
            else:
                self.failed += 1
        if not ok:
            log.warning("webhook delivery to %s given up after %d attempts", delivery.url, delivery.attempts)
        if delivery.done is not None:
            delivery.done(ok)

    def _attempt(self, delivery: Delivery) -> str:
        """One POST: "ok" (2xx), "retry" (worth another attempt) or "fail"."""
        ext = {"timeout": {k: self.timeout_s for k in ("connect", "read", "write", "pool")}}
        try:
            with httpcore.ConnectionPool(network_backend=CheckedBackend(self.allow_private), retries=0) as pool:
                with pool.stream("POST", delivery.url, headers=delivery.headers, content=delivery.body,
                                 extensions=ext) as response:
                    status = response.status
        except UnsafeUrl as exc:  # the host now resolves to a refused address, or not at all
            log.warning("webhook %s refused at delivery: %s", delivery.url, exc)
            return "retry" if exc.code == "url_unreachable" else "fail"
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.RemoteProtocolError) as exc:
            log.info("webhook %s attempt %d failed: %r", delivery.url, delivery.attempts, exc)
            return "retry"
        if 200 <= status < 300:
            return "ok"
        log.info("webhook %s attempt %d answered HTTP %d", delivery.url, delivery.attempts, status)
        return "retry" if status in RETRIED_STATUSES else "fail"
