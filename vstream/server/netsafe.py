"""Which URLs the server may pull from, and how it reaches them.

A URL source is checked before anything is read from it: the scheme must be allowed, the URL must parse the same way
for every reader (no backslashes, spaces, control characters or non-ASCII characters outside the host), and every
address its host resolves to must be a public one. A host written in Unicode is IDNA-encoded first, and refused when it
only spells an address (fullwidth digits that would read as 127.0.0.1). Loopback, private, link-local, shared,
multicast and reserved addresses are refused unless the server was started with `allow_private_sources`, and so are
IPv6 addresses that carry such an IPv4 address (IPv4-mapped, IPv4-compatible, 6to4, NAT64, Teredo).

For HTTP(S) the server follows redirects itself, at most `MAX_REDIRECTS`, checking each hop the same way on a
connection made to the address it checked; FFmpeg then reads the final URL with redirects turned off, so a later
redirect ends the stream instead of being followed. Plain HTTP is dialled at the checked address (the URL's host is
replaced by it), so a second DNS answer cannot move it; HTTPS keeps its host name for TLS, and a second resolution of
it is checked by nothing here. RTSP(S) goes through `rtsp_relay`: FFmpeg dials a relay on 127.0.0.1 that dials the
checked address and never passes a redirect on (FFmpeg would follow it anywhere, without limit). What FFmpeg itself may
open is fixed by `vstream.video.guarded`: the URL's own protocol only, and no playlist or other input that names
further URLs (HLS and DASH are refused, not resolved).

This module does not decode video and knows nothing about streams.
"""

from __future__ import annotations

import ipaddress
import socket
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpcore

from vstream.server.rtsp_relay import RtspRelay

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

    url: str  # the final URL, its host replaced by the checked address for http and rtsp (FFmpeg opens it for http(s))
    original: str
    address: str
    options: dict[str, str]
    size: int | None = None  # bytes the HTTP(S) server declares for the whole resource (None: not declared, or RTSP)
    relay: tuple[str, int, str | None] | None = None  # RTSP: (address, port, TLS host name for rtsps) the relay dials

    def connect(self, timeout: float) -> AbstractContextManager[str]:
        """For each open of the source: a context manager whose value is the URL FFmpeg opens (for RTSP, a new
        relay's on 127.0.0.1, cut when the context ends)."""
        if self.relay is None:
            return nullcontext(self.url)
        address, port, tls_host = self.relay
        return RtspRelay(self.url, address, port, timeout, tls_host)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: where the IPv4 address sits is the operator's choice


def embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address stands for, each with the name of its form (empty for plain addresses)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    found = []
    if ip.ipv4_mapped is not None:
        found.append(("IPv4-mapped", ip.ipv4_mapped))
    if int(ip) >> 32 == 0 and int(ip) > 1:  # ::a.b.c.d (:: and ::1 are themselves unspecified and loopback)
        found.append(("IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip in _NAT64:
        found.append(("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if ip.teredo is not None:
        server, client = ip.teredo
        found += [("Teredo server", server), ("Teredo client", client)]
    return found


def _kind_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    return None if ip.is_global else "not a public address"


def _refusals(address: str) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str]]:
    """(address, why) for `address` and each IPv4 address it carries that is not public; empty when all are."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip in _NAT64_LOCAL:
        return [(ip, "a local-use NAT64 address (64:ff9b:1::/48), which may carry any IPv4 address")]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # dialled as the IPv4 address itself
        why = _kind_refusal(ip.ipv4_mapped)
        return [] if why is None else [(ip.ipv4_mapped, f"the IPv4-mapped form of {ip.ipv4_mapped}, {why}")]
    out = []
    for form, v4 in embedded_ipv4(ip):
        if (why := _kind_refusal(v4)) is not None:
            out.append((v4, f"the {form} form of {v4}, {why}"))
    if (why := _kind_refusal(ip)) is not None:
        out.append((ip, why))
    return out


def address_refusal(address: str) -> str | None:
    """Why `address` may not be dialled without `allow_private_sources` (None: it is a public address)."""
    refusals = _refusals(address)
    return f"{address} is {refusals[0][1]}" if refusals else None


def allowed(address: str, allow_private) -> str | None:
    """Why `address` is refused under `allow_private` (True: all allowed; False: public only; or a list of networks,
    e.g. ["10.1.2.0/24"], allowed besides the public addresses); None when it may be dialled. An IPv6 address that
    carries an IPv4 address is allowed when both are public or in the list."""
    if allow_private is True:
        return None
    refusals = _refusals(address)
    if allow_private:
        networks = [ipaddress.ip_network(net) for net in allow_private]
        refusals = [(ip, why) for ip, why in refusals if not any(ip in net for net in networks)]
    return f"{address} is {refusals[0][1]}" if refusals else None


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


def ascii_url(url: str) -> str:
    """`url` with a Unicode host IDNA-encoded, so that every reader sees the same ASCII host; raises UnsafeUrl for
    non-ASCII characters elsewhere and for a Unicode host that only spells an address."""
    if url.isascii():
        return url
    _check_characters(url)
    try:
        parts = urlsplit(url)  # refuses a netloc with characters that NFKC turns into '/', '?', '#', '@' or ':'
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl(f"the URL {url!r} does not parse: {exc}", code="invalid_url") from exc
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host = hostport if port is None and not hostport.endswith(":") else hostport.rpartition(":")[0]
    if not (userinfo + parts.path + parts.query + parts.fragment).isascii() or host.startswith("["):
        raise UnsafeUrl(f"the URL {url!r} has non-ASCII characters outside its host name: expected them "
                        "percent-encoded", code="invalid_url")
    try:
        encoded = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise UnsafeUrl(f"the host {host!r} is not a valid international domain name: {exc}",
                        code="invalid_url") from exc
    if _is_address(encoded):
        raise UnsafeUrl(f"the host {host!r} is written with non-ASCII characters that read as the address "
                        f"{encoded!r}: expected an address written in ASCII digits", code="invalid_url")
    netloc = (userinfo + "@" if userinfo else "") + encoded + ("" if port is None else f":{port}")
    return urlunsplit(parts._replace(netloc=netloc))


def _is_address(host: str) -> bool:
    """Whether `host` is an IP address in any form the resolver accepts (127.1, 0x7f.1, 2130706433 included)."""
    try:
        socket.inet_aton(host)
        return True
    except OSError:
        pass
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _check_characters(url: str) -> None:
    if any(c in url for c in "\\ \t\r\n") or any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise UnsafeUrl(f"the URL {url!r} contains a backslash, a space or a control character", code="invalid_url")


def parse(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an ASCII URL that every reader parses alike; raises UnsafeUrl."""
    _check_characters(url)
    if not url.isascii():
        raise UnsafeUrl(f"the URL {url!r} has non-ASCII characters: expected an ASCII URL (an IDNA host name, "
                        "other characters percent-encoded)", code="invalid_url")
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


class CheckedBackend(httpcore.SyncBackend):
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
    with httpcore.ConnectionPool(network_backend=CheckedBackend(allow_private), retries=0) as pool:
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
                url = ascii_url(urljoin(url, location.decode("latin-1")))
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
    url = ascii_url(url)
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
    relay = (address, port, host if scheme == "rtsps" else None) if scheme.startswith("rtsp") else None
    return CheckedUrl(dial, url, address, options, size, relay)
