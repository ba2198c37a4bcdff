"""A one-connection RTSP relay that keeps FFmpeg to the address the server checked.

FFmpeg's rtsp demuxer follows a 3xx answer to wherever its Location points, to any host and with no limit (a redirect
loop makes it send thousands of requests a second), and no FFmpeg option turns that off. So FFmpeg never dials an RTSP
server itself: it dials this relay on 127.0.0.1, the relay dials the checked address (with TLS for rtsps, verifying the
URL's host name) and copies bytes both ways. The server's side is read in whole messages, framed as FFmpeg frames them
(`$` interleaved packets, text messages up to a blank line plus Content-Length bytes). An answer with a 3xx status ends
the connection before FFmpeg sees it: no redirect is followed and a connection carries at most one refused request.
So does anything FFmpeg could frame differently (a bare LF or a stray CR, a header line beginning with `$`, a head over
64 KiB, a body over 1 MiB), so that no redirect can hide from the relay inside what it took for data.

One relay serves one connection (one open of the source); each reconnect makes a new one. This module does not check
addresses (`netsafe` did, before) and does not look inside RTP packets.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import ssl
import threading
from urllib.parse import urlsplit, urlunsplit

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
_STATUS = re.compile(rb"RTSP/1\.[01] (\d{3})(?: [^\r\n]*)?")
_REQUEST = re.compile(rb"[A-Z_]+ [!-~]+ RTSP/1\.[01]")
_HEADER = re.compile(rb"([!-#%-9;-~][!-9;-~]*):([^\r\n]*)")  # a name that does not begin with '$', a colon, a value


class Refused(Exception):
    """The server sent what the relay does not pass to FFmpeg; the message says what."""


def messages(buffer: bytearray) -> int:
    """How many leading bytes of `buffer` (the server's side) are whole messages that may go to FFmpeg; raises
    Refused for a redirect or for anything FFmpeg could frame differently."""
    done = 0
    while done < len(buffer):
        if buffer[done] == ord("$"):  # interleaved packet: '$', channel, 16-bit length, payload
            if len(buffer) - done < 4:
                break
            end = done + 4 + int.from_bytes(buffer[done + 2:done + 4], "big")
        else:
            head_end = buffer.find(b"\r\n\r\n", done, done + MAX_HEAD + 4)
            if head_end < 0:
                if len(buffer) - done > MAX_HEAD:
                    raise Refused(f"a message head over {MAX_HEAD} bytes")
                break
            end = head_end + 4 + _body_length(bytes(buffer[done:head_end]))
        if end > len(buffer):
            break
        done = end
    return done


def _body_length(head: bytes) -> int:
    """The Content-Length of a message head (its lines without the final blank line); raises Refused."""
    first, *lines = head.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in (first, *lines)):
        raise Refused("a line that does not end with CRLF")
    status = _STATUS.fullmatch(first)
    if status is None and _REQUEST.fullmatch(first) is None:
        raise Refused(f"a first line {first[:80]!r} that is neither an RTSP status line nor a request")
    if status is not None and status.group(1).startswith(b"3"):
        location = next((v.strip() for n, _, v in (li.partition(b":") for li in lines) if n.lower() == b"location"),
                        b"")
        raise Refused(f"RTSP {status.group(1).decode()} redirecting to {location[:200].decode('latin-1')!r}: "
                      "redirects are not followed (give the final URL)")
    lengths = []
    for line in lines:
        header = _HEADER.fullmatch(line)
        if header is None:
            raise Refused(f"a header line {line[:80]!r} that is not 'Name: value'")
        if header.group(1).lower() == b"content-length":
            lengths.append(header.group(2).strip())
    if not lengths:
        return 0
    if len(lengths) > 1 or not lengths[0].isdigit() or int(lengths[0]) > MAX_BODY:
        raise Refused(f"Content-Length {b', '.join(lengths)[:80]!r}: expected one length of at most {MAX_BODY} bytes")
    return int(lengths[0])


class RtspRelay:
    """Listens on 127.0.0.1 for one connection and relays it to `address:port`; a context manager whose value is the
    URL FFmpeg opens (`url` with its host and port replaced by the relay's). `problem` says why the relay cut the
    connection, if it did."""

    def __init__(self, url: str, address: str, port: int, timeout: float, tls_host: str | None = None):
        self.address, self.port, self.timeout, self.tls_host = address, port, timeout, tls_host
        self.problem: str | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(timeout)
        self._sockets: list[socket.socket] = [self._listener]
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.url = urlunsplit(parts._replace(scheme="rtsp", netloc=netloc))
        self._thread = threading.Thread(target=self._serve, name="rtsp-relay", daemon=True)
        self._thread.start()

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Cut both connections and stop listening; the relay's thread ends."""
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):  # a socket already shut down
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's select
        self._thread.join(timeout=self.timeout + 1)
        for sock in self._sockets:
            sock.close()

    def _serve(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return  # nobody came within the timeout, or closed
        finally:
            self._listener.close()
        self._sockets.append(client)
        try:
            upstream = self._dial()
        except (OSError, ssl.SSLError) as exc:
            self.problem = f"the RTSP server {self.address}:{self.port} could not be reached: {exc}"
            return
        self._sockets.append(upstream)
        try:
            self._pump(client, upstream)
        except Refused as exc:
            self.problem = f"the RTSP server sent {exc}"
        except OSError:
            pass  # either side went away: FFmpeg sees the end of the connection
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):  # a socket already shut down
                    sock.shutdown(socket.SHUT_RDWR)

    def _dial(self) -> socket.socket:
        sock = socket.create_connection((self.address, self.port), timeout=self.timeout)
        if self.tls_host is not None:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.tls_host)
        sock.settimeout(None)  # from here every read waits in select, every write is the peer's pace
        return sock

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        pending = bytearray()
        while True:
            ready = [upstream] if isinstance(upstream, ssl.SSLSocket) and upstream.pending() else []
            ready = ready or select.select([client, upstream], [], [])[0]
            if client in ready:
                data = client.recv(65536)
                if not data:
                    return
                upstream.sendall(data)
            if upstream in ready:
                data = upstream.recv(65536)
                if not data:
                    return
                pending += data
                whole = messages(pending)
                if whole:
                    client.sendall(pending[:whole])
                    del pending[:whole]
