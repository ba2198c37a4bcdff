"""The page's session token: what `POST /v1/auth/cookie` puts in its HttpOnly cookie, and how a server tells a token it
may accept. Nothing here reads requests or sets cookies (`access` and `routes.auth` do).

A token is stateless: `v1.<expiry>.<nonce>.<mac>`, where the expiry is Unix seconds, the nonce 18 random bytes and the
mac HMAC-SHA256 of `v1.<expiry>.<nonce>` under a secret derived from the API key and a salt. Any process given the same
key and salt verifies it without asking another: the replicas of a cluster share one salt (`cluster.run.start_fleet`),
so a cookie minted by one works on all. A single server draws its own salt at start, so a restart logs every page out,
as it did when tokens were kept in memory; changing the key does too. The mac is compared in constant time; the token
carries no part of the key.

Logout. A stateless token stays valid until its expiry (12 h) wherever nothing else is known about it, so the process
the page talks to (the single server, or the cluster's ingress) keeps the tokens logged out through it in `Revoked`
until they expire, and refuses them. That set is small (a token enters it only at a logout, which needs a valid cookie
or the key), bounded (`MAX_REVOKED`; when it is full the token closest to its expiry goes first) and per process: it is
lost at a restart, which the salt makes harmless for a single server and a cluster (whose salt is new each launch).
A replica addressed directly, past the ingress, knows only the logouts it answered itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

VERSION = "v1"
TTL_S = 12 * 3600
MAX_REVOKED = 4096
NONCE_BYTES = 18
_CONTEXT = b"vstream page session cookie v1\0"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def stated_expiry(token: str | None) -> int | None:
    """The expiry (Unix seconds) a token names, unverified; None when it is not shaped like a token."""
    if not token or len(token) > 200:
        return None
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != VERSION or not (parts[1].isascii() and parts[1].isdigit()):
        return None
    return int(parts[1]) if len(parts[1]) <= 12 else None


class Revoked:
    """Tokens logged out before their expiry, each kept until then (at most `until_s` from now), at most `cap` of them:
    beyond it the one that expires soonest is forgotten."""

    def __init__(self, cap: int = MAX_REVOKED, until_s: float = TTL_S):
        if cap < 1:
            raise ValueError(f"the revocation set's cap must be >= 1, got {cap}")
        self.cap, self.until_s = cap, until_s
        self.tokens: dict[str, float] = {}  # token -> when it may be forgotten (Unix seconds)

    def add(self, token: str, now: float | None = None) -> None:
        """Record a logged-out token (one not shaped like a token is ignored: no server would accept it)."""
        expiry = stated_expiry(token)
        if expiry is None:
            return
        now = time.time() if now is None else now
        self.tokens = {t: e for t, e in self.tokens.items() if e >= now}
        if expiry < now:
            return
        self.tokens[token] = min(expiry, now + self.until_s)
        while len(self.tokens) > self.cap:
            del self.tokens[min(self.tokens, key=self.tokens.__getitem__)]

    def __contains__(self, token: object) -> bool:
        return token in self.tokens


class PageCookies:
    """Mints and checks page session tokens for one API key and salt, `ttl_s` long, and keeps the ones logged out here
    (`Revoked`). `api_key` None (a server without a key) still signs: the salt alone keys the mac."""

    def __init__(self, api_key: str | None, salt: bytes, ttl_s: float = TTL_S, max_revoked: int = MAX_REVOKED):
        if len(salt) < 16:
            raise ValueError(f"the cookie salt must have at least 16 bytes, got {len(salt)}")
        self.secret = hmac.new((api_key or "").encode(), _CONTEXT + salt, hashlib.sha256).digest()
        self.ttl_s = ttl_s
        self.revoked = Revoked(max_revoked, ttl_s)

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self.secret, body.encode("ascii"), hashlib.sha256).digest())

    def mint(self, now: float | None = None) -> str:
        """A new token, valid for `ttl_s` from `now` (Unix seconds; None: the clock)."""
        expiry = int((time.time() if now is None else now) + self.ttl_s)
        body = f"{VERSION}.{expiry}.{_b64(secrets.token_bytes(NONCE_BYTES))}"
        return f"{body}.{self._mac(body)}"

    def valid(self, token: str | None, now: float | None = None) -> bool:
        """Whether `token` was minted under this key and salt, is not past its expiry and was not logged out here."""
        expiry = stated_expiry(token)
        if expiry is None:
            return False
        body, _, mac = token.rpartition(".")
        if not hmac.compare_digest(self._mac(body).encode(), mac.encode("ascii", "replace")):
            return False
        return expiry > (time.time() if now is None else now) and token not in self.revoked

    def revoke(self, token: str | None, now: float | None = None) -> None:
        """Log a token out here (until its expiry); one this server would not accept anyway is not kept."""
        if self.valid(token, now):
            self.revoked.add(token, now)
