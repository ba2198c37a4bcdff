"""Who may call the server: which Host names it answers to, which Origins may change state or open a realtime
session, and the API key (or the page's cookie). `middleware.Gate` applies these to HTTP before any route reads the
request; the realtime route applies them to its handshake. Nothing here sends a response or knows about streams or
models.

Hosts. A request naming a Host outside `state.allowed_hosts` is refused (403), so that a page on a DNS-rebinding
domain cannot reach the server through the visitor's browser. `/health/*` is exempt (probes dial addresses).
`allowed_hosts` None means any Host: `create_app` uses that when an API key is set and no list is given, because a
rebinding page holds neither the key nor the page's cookie (cookies are bound to the name they were set under).

Origins. A browser sends `Origin` on cross-site requests and on every WebSocket handshake. A request that carries
one must come from the server's own origin (the Origin's host and port equal the Host header, itself allowed) to
use a method other than GET/HEAD/OPTIONS or to open `/v1/realtime`. Requests without Origin (curl, SDKs) pass.
"""

from __future__ import annotations

import contextlib
import hmac
import socket
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.requests import cookie_parser

from vstream.errors import UserInputError
from vstream.server.errors import ApiError
from vstream.server.state import ServerState

COOKIE = "vstream_session"
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# ---------------------------------------------------------------------------------------------------------- hosts


def allowed_hosts(names: Iterable[str] | None) -> frozenset[str] | None:
    """Host names as `ServerState.allowed_hosts` keeps them (lower case, IPv6 without brackets); '*' or None: any."""
    if names is None:
        return None
    kept = set()
    for name in names:
        if name == "*":
            return None
        bare = name.strip().lower().removeprefix("[").removesuffix("]") if isinstance(name, str) else ""
        if not bare or name.count(":") == 1 or any(c in bare for c in "/[]@ \t"):
            raise UserInputError(f"allowed hosts must be host names or addresses without a port (or '*'), "
                                 f"got {name!r}")
        kept.add(bare)
    if not kept:
        raise UserInputError("allowed hosts is empty: expected at least one host name, or '*' for any")
    return frozenset(kept)


def default_allowed_hosts(bind: str) -> frozenset[str]:
    """The names a server bound to `bind` answers as: the bind name, plus the loopback names when it is a loopback
    address; bound to every address (0.0.0.0, ::), the loopback names, the machine's host name and fully qualified
    name and the addresses these resolve to. Other names (a DNS alias, a proxy's) need `--allowed-host`."""
    bind = bind.strip("[]").lower()
    if bind not in ("", "0.0.0.0", "::"):
        return frozenset({bind}) | (LOOPBACK if bind in LOOPBACK or bind.startswith("127.") else frozenset())
    names = set(LOOPBACK) | {socket.gethostname().lower(), socket.getfqdn().lower()}
    for name in list(names - LOOPBACK):
        with contextlib.suppress(OSError):  # a host name that does not resolve adds only itself
            names |= {info[4][0].split("%")[0].lower() for info in socket.getaddrinfo(name, None)}
    return frozenset(names)


def host_name(value: str | None) -> str | None:
    """The name in a Host header or an origin's netloc (`name[:port]`, `[v6][:port]`), lower case and without
    brackets; None when it is malformed."""
    if not value:
        return None
    value = value.strip().lower()
    if value.startswith("["):
        name, closed, rest = value[1:].partition("]")
        return name if closed and name and (not rest or (rest[0] == ":" and rest[1:].isdigit())) else None
    name, _, port = value.partition(":")
    return name if name and (not port or port.isdigit()) else None


def _same_origin(origin: str, host: str | None) -> bool:
    """Whether an Origin header names the host and port in `host` (the request's Host header). The scheme is not
    compared: no other page can be served from this host and port, and a TLS proxy in front changes the scheme."""
    scheme, _, netloc = origin.lower().partition("://")
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default is None or host is None or not netloc or "/" in netloc:
        return False
    return netloc.removesuffix(default) == host.lower().removesuffix(default)


def refusal(state: ServerState, headers: Headers, path: str, method: str) -> ApiError | None:
    """The 403 for a Host this server does not answer to, or for a foreign Origin on a state-changing request
    (`method` "WEBSOCKET" for the realtime handshake); None when the request may go on."""
    host = headers.get("host")
    if state.allowed_hosts is not None and not path.startswith("/health/") \
            and host_name(host) not in state.allowed_hosts:
        shown = (host or "")[:100]
        return ApiError(403, f"the Host header {shown!r} names no host that this server answers to: expected one of "
                        "its allowed hosts (vstream serve --allowed-host)", code="host_not_allowed")
    origin = headers.get("origin")
    if origin is not None and method not in SAFE_METHODS and not _same_origin(origin, host):
        what = "open a realtime session" if method == "WEBSOCKET" else f"send {method} requests"
        return ApiError(403, f"the Origin {origin[:100]!r} is not this server's own origin: a page from another "
                        f"origin may not {what}", code="origin_not_allowed")
    return None


# ---------------------------------------------------------------------------------------------------------- key


def public(path: str) -> bool:
    return path.startswith("/health/") or path == "/" or path.startswith("/static/")


def authorized(state: ServerState, headers: Headers) -> bool:
    """The key in the Authorization header, or a valid page cookie (`cookies`) sent from the server's own origin."""
    if _keyed(state, headers):
        return True
    return cookie_may_count(headers) and state.cookies.valid(page_token(headers))


def cookie_login(state: ServerState, headers: Headers) -> str | None:
    """The page token an authorized request was let in by, or None when it needs none or carries the key: a socket or
    an event feed opened with a cookie ends when that cookie is logged out or expires."""
    return None if _keyed(state, headers) else page_token(headers)


def _keyed(state: ServerState, headers: Headers) -> bool:
    """No key is set, or the Authorization header carries it."""
    if state.api_key is None:
        return True
    given = headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode())


def page_token(headers: Headers) -> str | None:
    """The page's session token in the Cookie header, if any (unverified)."""
    return cookie_parser(headers.get("cookie", "")).get(COOKIE)


def cookie_may_count(headers: Headers) -> bool:
    """Whether a page cookie on this request may stand for the key: it comes without an Origin or from the server's own
    (a cookie is sent by the browser to every port of its host, whatever page asks)."""
    origin = headers.get("origin")
    return origin is None or _same_origin(origin, headers.get("host"))


NO_KEY = ApiError(401, "missing or wrong API key: expected 'Authorization: Bearer <key>'", code="invalid_api_key")
