"""The page's cookie login through the cluster's ingress, on a real local Ray instance with two replicas of the tiny
model and an API key: the cookie from a login through the ingress opens the streams of both replicas, over HTTP and
the realtime socket, without the key; a forged cookie, one sent from another origin and one logged out through the
ingress get 401 on every replica. One test, one cluster: a separate module, since the cluster of test_cluster.py has
no key."""

from __future__ import annotations

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from helpers import AUTH, DEADLINE_S, KEY, cluster_server, recv
from vstream.server.cookies import PageCookies

pytest.importorskip("ray", reason="the cluster needs the [ray] extra: pip install -e '.[ray]'")

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _statuses(base: str, stream_ids: list[str], headers: dict) -> dict[str, int]:
    """What a bare client (no key, no cookie jar) gets for each stream, by the replica that answers for it."""
    seen = {}
    for sid in stream_ids:
        r = httpx.get(f"{base}/v1/streams/{sid}", headers=headers, timeout=DEADLINE_S)
        seen[r.headers.get("x-vstream-replica", sid)] = r.status_code
    return seen


def test_a_cookie_from_a_login_through_the_ingress_opens_the_streams_of_every_replica(tmp_path):
    with cluster_server(2, tmp_path / "state", api_key=KEY) as (base, _), \
            httpx.Client(base_url=base, headers=AUTH, timeout=DEADLINE_S) as keyed:
        ids = [keyed.post("/v1/streams", json={"source": {"type": "push"}}).json()["id"] for _ in range(2)]
        owners = keyed.get("/v1/cluster").json()["streams"]
        assert {owners[sid] for sid in ids} == {"replica-1", "replica-2"}, "one stream on each replica"

        login = httpx.post(f"{base}/v1/auth/cookie", headers=AUTH, timeout=DEADLINE_S)
        assert login.status_code == 204
        attributes = login.headers["set-cookie"].lower()
        assert "httponly" in attributes and "samesite=strict" in attributes and "path=/" in attributes
        assert "domain" not in attributes, "bound to the host the page was loaded from"
        page = {"Cookie": f"vstream_session={login.cookies['vstream_session']}"}
        assert _statuses(base, ids, {}) == {"replica-1": 401, "replica-2": 401}, "the login opened nothing else"

        assert _statuses(base, ids, page) == {"replica-1": 200, "replica-2": 200}
        listed = httpx.get(f"{base}/v1/streams", headers=page, timeout=DEADLINE_S).json()["data"]
        assert sorted(s["id"] for s in listed) == sorted(ids)
        assert httpx.get(f"{base}/v1/cluster", headers=page, timeout=DEADLINE_S).status_code == 200
        for sid in ids:  # the page's socket: its Origin and its cookie, no key
            url = f"{base.replace('http://', 'ws://')}/v1/realtime?stream_id={sid}"
            with ws_connect(url, additional_headers=page | {"Origin": base}, open_timeout=DEADLINE_S) as ws:
                assert recv(ws, "session.created")["session"]["stream_id"] == sid

        forged = {"Cookie": f"vstream_session={PageCookies(KEY, b'not the cluster!').mint()}"}
        assert _statuses(base, ids, forged) == {"replica-1": 401, "replica-2": 401}
        foreign = page | {"Origin": "http://evil.example"}
        assert _statuses(base, ids, foreign) == {"replica-1": 401, "replica-2": 401}

        assert httpx.delete(f"{base}/v1/auth/cookie", headers=page, timeout=DEADLINE_S).status_code == 204
        assert _statuses(base, ids, page) == {"replica-1": 401, "replica-2": 401}, "logged out on every replica"
        for sid in ids:
            assert keyed.delete(f"/v1/streams/{sid}").status_code == 200
