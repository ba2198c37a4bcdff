"""The app factory: `create_app` assembles one `ServerState`, the gate and error handlers (`middleware`), the routes
(`routes/`, one module per resource), the OpenAPI document made true to the server (`openapi`) and the start-up
warm-up. `run.serve` runs the app under uvicorn.

The contract: routes only translate between the wire and `StreamSession`; model work never runs on the event loop;
the server keeps no history between questions and persists nothing but, with a state directory, each stream's
state (`durable`). Every error is an OpenAI error object; one that
no route expected is logged and answered with a 500 naming only its log reference. Design notes:
docs/architecture.md (Server).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from vstream.engine import EngineConfig, StreamSession, engine_of, snapshots
from vstream.errors import UserInputError
from vstream.server import access, openapi
from vstream.server.cookies import PageCookies
from vstream.server.durable import Durable
from vstream.server.errors import AsciiJSONResponse
from vstream.server.middleware import Gate, add_error_handlers
from vstream.server.routes import auth, chat, health, metrics, page, realtime, streams, watches
from vstream.server.state import Limits, ServerState
from vstream.server.webhooks import WebhookSender

# in this order in `app.routes` and the document
ROUTES = (page, health, auth, streams, watches, chat, realtime, metrics)
log = logging.getLogger("vstream.server")


def create_app(model, media_root: Path | None = None, api_key: str | None = None, max_streams: int = 8, *,
               allow_private_sources: bool = False, limits: Limits | None = None,
               allowed_hosts: Iterable[str] | None = None, state_dir: Path | None = None,
               snapshot_every: float = 10.0, memory_page: int | None = None, restore: bool = True,
               webhook_secret: str | None = None, cookie_salt: bytes | None = None) -> FastAPI:
    """The FastAPI app over a loaded model. `media_root` bounds file sources (None: file sources refused); URL sources
    on loopback, private or reserved addresses are refused unless `allow_private_sources`. `allowed_hosts`: the Host
    names requests may use ('*': any); None: the loopback names without a key, any with one (see `access`).
    `state_dir`: save every stream there every `snapshot_every` seconds and restore them at start (`durable`); a
    snapshot of another model or memory configuration there is an error here, before anything is served.
    `memory_page`: the engine's `EngineConfig.memory_page` (None: its default). `restore=False`: the state directory
    is shared with other servers (`vstream.cluster`): restore nothing at start, streams come by `Durable.adopt`.
    `webhook_secret`: the key that signs watch webhooks (None: watches with a webhook are refused). `cookie_salt`: with
    the key, what signs the page's session cookies: servers given the same key and salt accept each other's (a
    cluster's replicas); None: a new salt, so that the cookies end with this server (`cookies`)."""
    if media_root is not None and not Path(media_root).is_dir():
        raise UserInputError(f"media_root must be an existing directory, got {media_root}")
    if allowed_hosts is None and api_key is None:
        allowed_hosts = access.default_allowed_hosts("127.0.0.1")
    state = ServerState(model, None if media_root is None else Path(media_root), api_key, max_streams,
                        limits or Limits(), allow_private_sources, access.allowed_hosts(allowed_hosts),
                        memory_page=memory_page)
    state.cookies = PageCookies(api_key, secrets.token_bytes(16) if cookie_salt is None else cookie_salt)
    if webhook_secret:
        limits = state.limits
        state.webhooks = WebhookSender(webhook_secret.encode(), allow_private_sources, limits.url_timeout_s,
                                       limits.webhook_attempts, limits.webhook_backoff_s)
    if state_dir is not None:
        state.durable = Durable(Path(state_dir), snapshot_every, snapshots.identity(model), restore)
        state.durable.check()
    app = FastAPI(title="vstream", lifespan=lifespan, version="0.1.0", default_response_class=AsciiJSONResponse,
                  description="Question answering over live video streams from a bounded STAR memory.")
    app.state.vstream = state
    app.add_middleware(Gate, state=state)
    add_error_handlers(app)
    openapi.install(app, state)
    for module in ROUTES:
        module.add_routes(app)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Warm up before the first request is accepted; close every stream at shutdown."""
    state: ServerState = app.state.vstream
    state.warmup_s = await run_in_threadpool(warm_up, state)
    if state.durable is not None:
        if state.durable.restore_at_start:
            await run_in_threadpool(state.durable.restore, state)
        state.durable.start(state)
    state.ready = True
    yield
    state.ready = False
    if state.watcher is not None:
        await run_in_threadpool(state.watcher.stop)
    if state.webhooks is not None:
        await run_in_threadpool(state.webhooks.stop)
    if state.durable is not None:  # on drain: every stream saved before it closes
        await run_in_threadpool(state.durable.stop)
        await run_in_threadpool(state.durable.save_all, state, True)
    for stream in list(state.streams.values()):
        await run_in_threadpool(stream.close)


def warm_up(state: ServerState) -> float:
    """Make the model's engine with the server's limits (graph captures; an engine that already serves the model,
    made by an earlier app in this process, is kept as it is) and run one whole answer path through it on a blank
    frame (crop, encode, memory, projector, prefill, decode), so that the first real request pays no first-use costs;
    returns seconds."""
    import numpy as np

    t0 = time.perf_counter()
    model = state.model
    limits = state.limits
    page = {} if state.memory_page is None else {"memory_page": state.memory_page}
    state.engine = engine_of(model, EngineConfig(answer_slots=min(limits.max_running, 32),
                                                 max_waiting=limits.max_running, **page))
    log.info("engine ready in %.1f s (%s)", state.engine.warmup_s, state.engine.stats())
    side = model.cfg.vision.image_size
    with StreamSession(model, engine=state.engine) as session:
        session.lane.put(0.0, model.crop([np.zeros((side, side, 3), np.uint8)])[0])
        session.wait_for_frames(1, timeout=600)
        session.ask("What is on the screen?", max_new_tokens=2)
    return time.perf_counter() - t0
