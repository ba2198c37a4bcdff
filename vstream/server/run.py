"""Serving the app until it is told to stop: `serve` loads the model, builds the app and runs uvicorn; the first
SIGINT/SIGTERM drains (`begin_drain`), a second one stops at once. Nothing here handles a request."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

import uvicorn

from vstream.server import access
from vstream.server.app import create_app
from vstream.server.state import Limits, ServerState


def begin_drain(state: ServerState, grace_s: float) -> None:
    """Stop taking work: readiness turns 503, new streams, sessions and questions get 503, and open sessions get a
    `session.closing` notice and are closed after `grace_s` seconds. Thread-safe."""
    state.drain_deadline = time.monotonic() + grace_s
    state.draining = True


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first exit signal drains the app's state for `drain_s` seconds (0: no drain); it stops
    once no socket and no answer is left, or when the grace period ends."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_s: float):
        super().__init__(config)
        self.state, self.drain_s = state, drain_s

    def handle_exit(self, sig, frame):
        if self.state.draining or self.drain_s <= 0:
            return super().handle_exit(sig, frame)
        begin_drain(self.state, self.drain_s)
        threading.Thread(target=self._stop_when_done, daemon=True).start()

    def _stop_when_done(self) -> None:
        state = self.state
        while time.monotonic() < state.drain_deadline + 0.5 and (state.sockets or state.running):
            time.sleep(0.05)
        self.should_exit = True


def serve(model_name_or_path: str, host: str = "127.0.0.1", port: int = 8000, media_root: Path | None = None,
          api_key: str | None = None, max_streams: int = 8, device: str = "auto", *,
          allow_private_sources: bool = False, drain_s: float = 10.0, limits: Limits | None = None,
          allowed_hosts: Iterable[str] = (), state_dir: Path | None = None, snapshot_every: float = 10.0,
          memory_page: int | None = None, webhook_secret: str | None = None, lora: str | None = None) -> None:
    """Load the model with `vstream.load` and serve until interrupted. The first SIGINT/SIGTERM drains (see
    `begin_drain`) for up to `drain_s` seconds, then stops; a second one stops at once. Requests may name the
    Host names `host` is bound as (`access.default_allowed_hosts`) and `allowed_hosts` ('*': any); with an API key
    and no `allowed_hosts`, any Host (see `access`). `state_dir`, `snapshot_every`: durable streams (`durable`);
    `memory_page`: streams per memory page (`EngineConfig.memory_page`; None: its default); `webhook_secret`: signs
    watch webhooks (None: webhooks refused); `lora`: an adapter folder merged into a Qwen model (`vstream.load`)."""
    import vstream

    extra = list(allowed_hosts)
    hosts = None if api_key is not None and not extra else [*access.default_allowed_hosts(host), *extra]
    access.allowed_hosts(hosts)  # a malformed name is an error before the model loads
    model = vstream.load(model_name_or_path, device=device, lora=lora)
    limits = limits or Limits()
    app = create_app(model, media_root, api_key, max_streams, allow_private_sources=allow_private_sources,
                     limits=limits, allowed_hosts=hosts or ["*"], state_dir=state_dir, snapshot_every=snapshot_every,
                     memory_page=memory_page, webhook_secret=webhook_secret)
    config = uvicorn.Config(app, host=host, port=port, ws_max_size=limits.max_ws_message_bytes + 1024,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, app.state.vstream, drain_s).run()
