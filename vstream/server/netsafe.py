"""Which URLs the server may pull from, and how it reaches them.

A URL source is checked before anything is read from it: the scheme must be allowed, the URL must parse the same way
for every reader (no backslashes, spaces or control characters), and every address its host resolves to must be a
public one. Loopback, private, link-local, shared, multicast and reserved addresses (IPv4-mapped IPv6 included) are
refused unless the server was started with `allow_private_sources`. For HTTP(S) the server follows redirects itself,
at most `MAX_REDIRECTS`, checking each hop the same way on a connection made to the address it checked; FFmpeg then
reads the final URL with redirects turned off, so a later redirect ends the stream instead of being followed. Plain
HTTP and RTSP are dialled at the checked address (the URL's host is replaced by it), so a second DNS answer cannot
move them. HTTPS keeps its host name for TLS; a second resolution of it is checked by nothing here.

This module does not decode video and knows nothing about streams.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpcore

ALLOWED_SCHEMES = ("http", "https", "rtsp", "rtsps")
MAX_REDIRECTS = 3
_DEFAULT_PORTS = {"http": 80, "https": 443, "rtsp": 554, "rtsps": 322}


class UnsafeUrl(ValueError):
    """A URL the server must not read; `code` says why (`url_forbidden`, `invalid_url`, `url_unreachable`)."""

    def __init__(self, message: str, code: str = "url_forbidden"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CheckedUrl:
    """A URL that passed the checks, the address to dial and the FFmpeg options that keep FFmpeg to it."""

    url: str  # what FFmpeg opens (the host replaced by the checked address for http and rtsp)
    original: str
    address: str
    options: dict[str, str]
    size: int | None = None  # bytes the HTTP(S) server declares for the whole resource (None: not declared, or RTSP)


def address_refusal(address: str) -> str | None:
    """Why `address` may not be dialled without `allow_private_sources` (None: it is a public address)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return f"{address} is a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return f"{address} is not a public address"
    return None


def allowed(address: str, allow_private) -> str | None:
    """Why `address` is refused under `allow_private` (True: all allowed; False: public only; or a list of networks,
    e.g. ["10.1.2.0/24"], allowed besides the public addresses); None when it may be dialled."""
    if allow_private is True:
        return None
    why = address_refusal(address)
    if why is None or not allow_private:
        return why
    ip = ipaddress.ip_address(address.split("%")[0])
    return None if any(ip in ipaddress.ip_network(net) for net in allow_private) else why


def resolve_checked(host: str, port: int, allow_private) -> str:
    """The first address of `host`, after checking every address it resolves to; raises UnsafeUrl."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeUrl(f"the host {host!r} does not resolve: {exc}", code="url_unreachable") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        why = allowed(address, allow_private)
        if why is not None:
            raise UnsafeUrl(f"the host {host!r} resolves to {why}: expected a public address "
                            "(start the server with --allow-private-sources to allow it)")
    return addresses[0]


def parse(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL that every reader parses alike; raises UnsafeUrl."""
    if any(c in url for c in "\\ \t\r\n") or any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise UnsafeUrl(f"the URL {url!r} contains a backslash, a space or a control character", code="invalid_url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl(f"the URL {url!r} does not parse: {exc}", code="invalid_url") from exc
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise UnsafeUrl(f"unsupported URL scheme {scheme!r} in {url!r}: expected one of {ALLOWED_SCHEMES}",
                        code="invalid_url")
    if not parts.hostname:
        raise UnsafeUrl(f"the URL {url!r} names no host", code="invalid_url")
    return scheme, parts.hostname, port or _DEFAULT_PORTS[scheme]


class _CheckedBackend(httpcore.SyncBackend):
    """Dials only addresses that pass the checks (the host is resolved here, once per connection)."""

    def __init__(self, allow_private: bool):
        super().__init__()
        self.allow_private = allow_private

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        address = resolve_checked(host, port, self.allow_private)
        return super().connect_tcp(address, port, timeout, local_address, socket_options)


def follow_redirects(url: str, allow_private: bool, timeout: float) -> tuple[str, int | None]:
    """The URL an HTTP(S) URL finally leads to, each hop checked, and the size its server declares (from
    Content-Range's total, or Content-Length when the range is ignored); raises UnsafeUrl."""
    with httpcore.ConnectionPool(network_backend=_CheckedBackend(allow_private), retries=0) as pool:
        for _ in range(MAX_REDIRECTS + 1):
            scheme, _host, _port = parse(url)
            if scheme not in ("http", "https"):
                raise UnsafeUrl(f"a redirect leads to {url!r}: expected an http or https URL")
            ext = {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}}
            try:
                with pool.stream("GET", url, headers=[(b"Range", b"bytes=0-0")], extensions=ext) as response:
                    status = response.status
                    headers = dict((k.lower(), v) for k, v in response.headers)
                    location = headers.get(b"location")
            except httpcore.TimeoutException as exc:
                raise UnsafeUrl(f"{url} did not answer within {timeout} s", code="url_unreachable") from exc
            except (httpcore.ConnectError, httpcore.ReadError, httpcore.RemoteProtocolError) as exc:
                raise UnsafeUrl(f"{url} could not be reached: {exc}", code="url_unreachable") from exc
            if status in (301, 302, 303, 307, 308) and location is not None:
                url = urljoin(url, location.decode("latin-1"))
                continue
            if status >= 400:
                raise UnsafeUrl(f"{url} answered HTTP {status}: expected a video", code="url_unreachable")
            return url, _declared_size(status, headers)
    raise UnsafeUrl(f"more than {MAX_REDIRECTS} redirects from the URL: expected at most {MAX_REDIRECTS}")


def _declared_size(status: int, headers: dict[bytes, bytes]) -> int | None:
    if status == 206:  # "bytes 0-0/12345"; "*" when the total is unknown
        total = headers.get(b"content-range", b"").rpartition(b"/")[2]
        return int(total) if total.isdigit() else None
    length = headers.get(b"content-length", b"")
    return int(length) if status == 200 and length.isdigit() else None


def check_url(url: str, allow_private: bool, timeout: float = 5.0) -> CheckedUrl:
    """Check a source URL (following HTTP redirects) and say how FFmpeg must open it; raises UnsafeUrl."""
    scheme, _, _ = parse(url)
    final, size = follow_redirects(url, allow_private, timeout) if scheme in ("http", "https") else (url, None)
    scheme, host, port = parse(final)
    address = resolve_checked(host, port, allow_private)
    options: dict[str, str] = {}
    dial = final
    if scheme in ("http", "rtsp"):
        parts = urlsplit(final)
        netloc = f"[{address}]" if ":" in address else address
        userinfo = parts.netloc.rpartition("@")[0]
        dial = urlunsplit(parts._replace(netloc=(userinfo + "@" if userinfo else "") + f"{netloc}:{port}"))
        if scheme == "http":
            options["headers"] = f"Host: {parts.netloc.rpartition('@')[2]}\r\n"
    if scheme in ("http", "https"):
        options["max_redirects"] = "0"
    return CheckedUrl(dial, url, address, options, size)
