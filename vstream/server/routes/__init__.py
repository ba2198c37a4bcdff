"""The HTTP and WebSocket routes, one module per resource. Each module's `add_routes(app)` is its route table (path,
method, statuses, handler); `vstream.server.app` calls them in order. A handler gets the server's state through its
`State` parameter (the app's `state.vstream`), never from a closure.

Route tables rather than `APIRouter`s: FastAPI 0.165 keeps an included router as a single opaque entry of
`app.routes`, and the app's routes are meant to be listed there (the key check of every route walks that list).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from vstream.server.state import ServerState


def server_state(connection: HTTPConnection) -> ServerState:
    """The state of the app that serves this request or socket."""
    return connection.app.state.vstream


State = Annotated[ServerState, Depends(server_state)]
