"""`vstream serve`: the HTTP API, the realtime WebSocket and the web page. The server is `vstream.server`; this module
checks the options (before the model loads) and shows the model's load stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vstream.cli.extras import needs_extra
from vstream.cli.options import DEFAULT_MODEL, DeviceOpt, ModelOpt
from vstream.errors import UserInputError


def serve(
    model: ModelOpt = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    media_root: Annotated[
        Optional[Path], typer.Option(help="Directory that file sources must lie in (none: no files).")
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(envvar="VSTREAM_API_KEY", help="Require 'Authorization: Bearer KEY' (all routes but /health/*)."),
    ] = None,
    max_streams: Annotated[int, typer.Option(help="Most streams open at once.")] = 8,
    device: DeviceOpt = "auto",
    allow_private_sources: Annotated[
        bool, typer.Option(help="Let URL sources reach loopback, private, link-local and reserved addresses.")
    ] = False,
    drain_seconds: Annotated[
        float, typer.Option(help="On SIGTERM/Ctrl-C: not ready, sessions notified, closed after this long.")
    ] = 10.0,
    allowed_host: Annotated[
        Optional[list[str]],
        typer.Option(metavar="NAME", help="Also accept this Host name (repeatable; '*': any). Accepted anyway: "
                     "the names --host is bound as (all of the machine's for 0.0.0.0); with --api-key and no "
                     "--allowed-host, any."),
    ] = None,
    state_dir: Annotated[
        Optional[Path], typer.Option(help="Save every stream's memory, source and settings here and restore them "
                                     "at start (made if missing; see README, Durable streams).")
    ] = None,
    snapshot_every: Annotated[
        float, typer.Option(help="With --state-dir: seconds between snapshots (a kill -9 loses at most this much).")
    ] = 10.0,
    memory_page: Annotated[
        Optional[int], typer.Option(help="Streams whose memories update together in one batched update (a memory "
                                    "page); 0: each memory alone. Default: the engine's (see EngineConfig).")
    ] = None,
    webhook_secret: Annotated[
        Optional[str], typer.Option(envvar="VSTREAM_WEBHOOK_SECRET", help="Sign watch webhooks with this key "
                                    "(HMAC-SHA256, header X-Vstream-Signature); none: watches may not name a webhook.")
    ] = None,
) -> None:
    """Serve the HTTP API, the realtime WebSocket and the web page at / (see README, HTTP API)."""
    needs_extra("server", "serve")
    from vstream.model.loading import show_progress
    from vstream.server import serve as run_server

    _check(media_root, max_streams, drain_seconds)
    if not snapshot_every > 0:
        raise UserInputError(f"--snapshot-every must be > 0 seconds, got {snapshot_every}")
    if memory_page is not None and memory_page < 0:
        raise UserInputError(f"--memory-page must be >= 0 (0: off), got {memory_page}")
    show_progress()  # the model's load stages on stderr, before uvicorn's own lines
    run_server(model, host=host, port=port, media_root=media_root, api_key=api_key,
               max_streams=max_streams, device=device, allow_private_sources=allow_private_sources,
               drain_s=drain_seconds, allowed_hosts=allowed_host or (), state_dir=state_dir,
               snapshot_every=snapshot_every, memory_page=memory_page, webhook_secret=webhook_secret)


def _check(media_root: Path | None, max_streams: int, drain_seconds: float) -> None:
    if media_root is not None and not media_root.is_dir():
        raise UserInputError(f"--media-root must be an existing directory, got {media_root}")
    if max_streams < 1:
        raise UserInputError(f"--max-streams must be >= 1, got {max_streams}")
    if drain_seconds < 0:
        raise UserInputError(f"--drain-seconds must be >= 0, got {drain_seconds}")
