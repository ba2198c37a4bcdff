"""The page's session token (`vstream.server.cookies`), without a server: it verifies under its key and salt, and
nowhere else; a token altered in any part, past its expiry or logged out does not; the logouts kept are bounded."""

from __future__ import annotations

import pytest

from vstream.server.cookies import MAX_REVOKED, TTL_S, PageCookies, Revoked, stated_expiry

KEY, SALT = "test-key-123", b"s" * 16
NOW = 1_800_000_000.0


def test_a_minted_token_verifies_until_its_expiry_under_any_instance_with_the_same_key_and_salt():
    cookies = PageCookies(KEY, SALT)
    token = cookies.mint(NOW)
    assert token.startswith("v1.") and KEY not in token and stated_expiry(token) == int(NOW + TTL_S)
    assert cookies.valid(token, NOW) and cookies.valid(token, NOW + TTL_S - 1)
    assert PageCookies(KEY, SALT).valid(token, NOW), "another process with the key and salt (a replica) accepts it"
    assert not cookies.valid(token, NOW + TTL_S), "expired"
    assert cookies.mint(NOW) != token, "each login gets its own nonce"


@pytest.mark.parametrize("other", [PageCookies("other-key", SALT), PageCookies(KEY, b"t" * 16),
                                   PageCookies(None, SALT)], ids=["key", "salt", "no-key"])
def test_a_token_of_another_key_or_salt_is_refused(other):
    assert not PageCookies(KEY, SALT).valid(other.mint(NOW), NOW)


def _altered(token: str) -> list[str]:
    version, expiry, nonce, mac = token.split(".")
    flip = lambda s: ("A" if s[0] != "A" else "B") + s[1:]  # noqa: E731
    return [f"{version}.{int(expiry) + 3600}.{nonce}.{mac}", f"{version}.{expiry}.{flip(nonce)}.{mac}",
            f"{version}.{expiry}.{nonce}.{flip(mac)}", f"{version}.{expiry}.{nonce}.{mac[:-1]}",
            f"v2.{expiry}.{nonce}.{mac}", f"{version}.{expiry}.{nonce}", f"{token}.x", f"{version}.{expiry}.{nonce}.",
            f"{version}.-{expiry}.{nonce}.{mac}", f"{version}.{expiry}.{nonce}.{mac[:-1]}é", token.upper(), "", "x"]


def test_a_tampered_or_malformed_token_is_refused():
    cookies = PageCookies(KEY, SALT)
    token = cookies.mint(NOW)
    for bad in [*_altered(token), None, "v1.9" + "9" * 300 + ".a.b"]:
        assert not cookies.valid(bad, NOW), bad


def test_a_logged_out_token_is_refused_and_the_others_are_not():
    cookies = PageCookies(KEY, SALT)
    out, kept = cookies.mint(NOW), cookies.mint(NOW)
    cookies.revoke(out, NOW)
    assert not cookies.valid(out, NOW) and cookies.valid(kept, NOW)
    cookies.revoke(PageCookies("other-key", SALT).mint(NOW), NOW)
    cookies.revoke("not a token", NOW)
    assert list(cookies.revoked.tokens) == [out], "only tokens this server accepts are kept"


def test_the_revoked_set_forgets_tokens_at_their_expiry_and_the_soonest_to_expire_beyond_its_cap():
    revoked = Revoked(cap=2)
    cookies = PageCookies(KEY, SALT)
    first, second, third = (cookies.mint(NOW + k) for k in range(3))
    for token in (second, first, third):
        revoked.add(token, NOW + 2)
    assert first not in revoked and second in revoked and third in revoked
    revoked.add(cookies.mint(NOW + 10), NOW + TTL_S + 1.5)  # second expired meanwhile (third not yet)
    assert second not in revoked and third in revoked and len(revoked.tokens) == 2
    far = f"v1.{int(NOW) + 10 * TTL_S}.n.m"  # a stated expiry no real token has: kept no longer than a real one
    lone = Revoked()
    lone.add(far, NOW)
    assert lone.tokens == {far: NOW + TTL_S}
    assert MAX_REVOKED >= 1024


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least 16 bytes, got 4"):
        PageCookies(KEY, b"salt")
    with pytest.raises(ValueError, match=">= 1, got 0"):
        Revoked(cap=0)
