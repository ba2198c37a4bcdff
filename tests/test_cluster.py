"""The cluster on a real local Ray instance (2 CPUs) that this module starts: the ingress in front of two engine
replicas of the tiny model, sharing one state directory, driven through the real HTTP and WebSocket API. Streams spread
over both replicas and every question is answered by its owner; a stream moves by drain -> snapshot -> restore through
`POST /v1/cluster/streams/{id}/move` while a socket pushes frames into it (the socket stays open, the frames sent
meanwhile are held by the ingress and ingested by the new owner); a busy owner answers 429 itself; a replica killed
with SIGKILL has its streams restored on the other from their snapshots (the time is measured and bounded); a third
replica joins and takes the new streams. The replicas listen on the node's address, as on several machines (the
server tests' cluster case uses loopback). The tests run in order and share the cluster."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.sync.client import connect as ws_connect

import vstream
from helpers import DEADLINE_S, assert_error, cluster_server, recv, wait_until
from vstream.engine import snapshots
from vstream.server.state import Limits
from vstream.synth.clips import write_test_video

ray = pytest.importorskip("ray", reason="the cluster needs the [ray] extra: pip install -e '.[ray]'")

pytestmark = [pytest.mark.ray, pytest.mark.slow]
EVERY_S = 0.5  # the replicas' snapshot interval
FAILOVER_BOUND_S = 10.0  # from SIGKILL to the first answer from the new owner; measured ~1-3 s on 2 cores
HI = [{"role": "user", "content": "What is on the screen?"}]
HELD = 4  # frames the ingress holds per socket while its stream moves
LIMITS = Limits(max_running=1, move_held_frames=HELD)  # one answer at a time per replica: a long one makes it busy
LONG = {"type": "response.create", "question": "What is on the screen?", "max_tokens": 1024}  # ~1 s on 2 cores


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(ingress base URL, fleet actor, state directory, media root); Ray shut down at the end."""
    root = tmp_path_factory.mktemp("cluster")
    media, state_dir = root / "media", root / "state"
    media.mkdir()
    write_test_video(media / "clip.mp4", seconds=8, fps=5)
    with cluster_server(2, state_dir, None, media_root=media, snapshot_every=EVERY_S, limits=LIMITS) as (base, fleet):
        yield base, fleet, state_dir, media


def jpeg(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), value, np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def connect(base: str, stream_id: str | None = None):
    query = f"?stream_id={stream_id}" if stream_id else ""
    return ws_connect(base.replace("http://", "ws://") + "/v1/realtime" + query, open_timeout=DEADLINE_S,
                      close_timeout=5)


def frame(t: float, value: int, event_id: str | None = None) -> str:
    return json.dumps({"type": "input_video_frame.append", "timestamp": t, "event_id": event_id,
                       "image": base64.b64encode(jpeg(value)).decode()})


def push(base: str, stream_id: str, times: list[float], value: int) -> None:
    with connect(base, stream_id) as ws:
        recv(ws, "session.created")
        for t in times:
            ws.send(frame(t, value))
            assert recv(ws, "input_video_frame.ack")["accepted"]


def ingested(client, sid: str, count: int) -> dict:
    return wait_until(lambda: (v := client.get(f"/v1/streams/{sid}").json()).get("stats", {}).get(
        "frames_encoded", 0) >= count and v, f"{count} frames of {sid} ingested")


def ask(client, sid: str) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": sid, "messages": HI, "max_tokens": 3})


def move(base: str, stream_id: str, replica: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/cluster/streams/{stream_id}/move", json={"replica": replica}, timeout=DEADLINE_S)


def directory(fleet) -> dict:
    return ray.get(fleet.listing.remote())


def other(replica_id: str) -> str:
    return "replica-2" if replica_id == "replica-1" else "replica-1"


def replica(fleet, replica_id: str) -> dict:
    return next(r for r in directory(fleet)["replicas"] if r["id"] == replica_id)


def own_ids(url: str) -> set[str]:
    """The streams a replica's own server holds (asked directly, not through the ingress)."""
    return {s["id"] for s in httpx.get(url + "/v1/streams", timeout=DEADLINE_S).json()["data"]}


def cites_only(answer: dict, times: set[float]) -> None:
    cited = set(answer["vstream"]["spatial_times"]) | set(answer["vstream"]["retrieved_times"])
    assert cited and cited <= times, f"the answer cites {sorted(cited)}: expected times of its stream {sorted(times)}"


STREAMS: dict[str, set[float]] = {}  # stream id -> the times pushed into it (shared by the tests, in order)


def test_streams_spread_over_both_replicas_and_each_is_answered_by_its_owner(cluster):
    base, fleet, _, _ = cluster
    with httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        for k in range(4):
            r = client.post("/v1/streams", json={"source": {"type": "push"}})
            assert r.status_code == 201, r.text
            times = {100.0 * k + i for i in range(3)}
            push(base, r.json()["id"], sorted(times), 60 * k)
            STREAMS[r.json()["id"]] = times
        with connect(base) as ws:  # a socket's own push stream, created on a replica; binary frames pass as JPEG
            sid = recv(ws, "session.created")["session"]["stream_id"]
            ws.send(jpeg(200))
            assert recv(ws, "input_video_frame.ack")["accepted"]
            assert directory(fleet)["streams"][sid] is not None
        wait_until(lambda: sid not in directory(fleet)["streams"], "the socket's stream forgotten when it closed")
        listing = directory(fleet)
        owners = listing["streams"]
        assert set(owners) == set(STREAMS)
        assert {owners[s] for s in STREAMS} == {"replica-1", "replica-2"}, "new streams go to the least-loaded"
        for r in listing["replicas"]:
            assert own_ids(r["url"]) == set(r["streams"]), "a replica holds exactly the streams it owns"
        listed = [s["id"] for s in client.get("/v1/streams").json()["data"]]
        assert sorted(listed) == sorted(STREAMS), "every stream listed once"
        for sid, times in STREAMS.items():
            ingested(client, sid, 3)
            r = ask(client, sid)
            assert r.status_code == 200, r.text
            assert r.headers["x-vstream-replica"] == owners[sid]
            cites_only(r.json(), times)
            memory = client.get(f"/v1/streams/{sid}/memory").json()
            assert memory["frames_seen"] == 3 and memory["stream_time"] == max(times)
        wait_until(lambda: all((r["ttft_p95_ms"] or 0) > 0 for r in directory(fleet)["replicas"]),
                   "each replica reports its answers' p95 time to first token (what --ttft-target-ms scales on)")
        metrics = client.get("/metrics").text.splitlines()  # every replica's, server-wide samples labelled with it
        for sid in STREAMS:
            assert f'vstream:frames_ingested_total{{stream_id="{sid}"}} 3' in metrics
        assert sum(line.startswith("# TYPE vstream:frames_ingested_total ") for line in metrics) == 1
        running = [line for line in metrics if line.startswith("vstream:num_requests_running{")]
        assert sorted(running) == [f'vstream:num_requests_running{{replica="replica-{i}"}} 0' for i in (1, 2)]
        missing = client.get("/v1/streams/str_0123456789abcdef")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "stream_not_found"
        foreign = client.get("/v1/streams", headers={"Host": "evil.example"})
        assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "host_not_allowed"


def test_a_stream_moves_through_the_route_with_its_socket_attached_and_the_frames_sent_meanwhile(cluster):
    """The socket stays open through the move; the answer in progress finishes on the old owner, which holds the
    move until then; the frames sent meanwhile are held by the ingress (the oldest dropped beyond HELD, each with an
    error event) and ingested by the new owner after the restore; questions get 503 naming the move, a second move
    409. The memory continues from the snapshot: frames after == before + sent during - dropped."""
    base, fleet, state_dir, _ = cluster
    sid = next(iter(STREAMS))
    source = directory(fleet)["streams"][sid]
    target, before, last = other(source), len(STREAMS[sid]), max(STREAMS[sid])
    during = [last + 1 + i for i in range(HELD + 2)]  # two more than the ingress holds
    moved: dict = {}
    with httpx.Client(base_url=base, timeout=DEADLINE_S) as client, connect(base, sid) as ws:
        recv(ws, "session.created")
        ws.send(json.dumps(LONG))
        recv(ws, "response.created")
        mover = threading.Thread(target=lambda: moved.update(r=move(base, sid, target)))
        mover.start()
        assert recv(ws, "stream.moving")["held_frames"] == HELD
        for i, t in enumerate(during):
            ws.send(frame(t, 30, f"m{i}"))
        ws.send(json.dumps({"type": "response.create", "event_id": "q", "question": "And now?"}))
        asked = ask(client, sid)
        assert assert_error(asked, 503)["code"] == "stream_moving" and f"moving to replica {target}" in asked.text
        assert asked.headers["retry-after"] == "1"
        assert assert_error(move(base, sid, target), 409)["code"] == "moving"
        events = []
        while sum(e["type"] == "input_video_frame.ack" for e in events) < len(during) - 2:
            events.append(recv(ws))
        mover.join(DEADLINE_S)
        kinds = [e["type"] for e in events]
        assert "session.closing" not in kinds and "session.created" not in kinds, "the client keeps its session"
        done = next(e for e in events if e["type"] == "response.done")
        assert done["response"]["status"] == "completed", "the answer in progress finished on the old owner"
        errors = {e["error"]["event_id"]: e["error"]["code"] for e in events if e["type"] == "error"}
        assert errors == {"m0": "frame_dropped", "m1": "frame_dropped", "q": "stream_moving"}, "the oldest dropped"
        acks = [e for e in events if e["type"] == "input_video_frame.ack"]
        assert [a["item_event_id"] for a in acks] == [f"m{i}" for i in range(2, len(during))]
        assert all(a["accepted"] for a in acks)
        assert kinds.index("stream.moved") < kinds.index("input_video_frame.ack"), "held until the restore"
        assert next(e for e in events if e["type"] == "stream.moved")["replica"] == target
        ws.send(frame(during[-1] + 1, 40, "after"))  # the same socket goes on with the new owner
        assert recv(ws, "input_video_frame.ack")["item_event_id"] == "after"
        r = moved["r"]
        assert r.status_code == 200, r.text
        assert (r.json()["replica"], r.json()["from"]) == (target, source)
        assert (r.json()["frames"], r.json()["stream_time"]) == (before, last), "restored as it was saved"
        kept = during[2:] + [during[-1] + 1]
        STREAMS[sid] |= set(kept)
        ingested(client, sid, len(kept))  # its new owner counts from the restore
        memory = client.get(f"/v1/streams/{sid}/memory").json()
        assert (memory["frames_seen"], memory["stream_time"]) == (before + len(kept), max(kept))
        assert own_ids(replica(fleet, target)["url"]) >= {sid} and sid not in own_ids(replica(fleet, source)["url"])
        listed = [s for s in client.get("/v1/streams").json()["data"] if s["id"] == sid]
        assert [s["replica"] for s in listed] == [target], "listed once, with its new owner"
        r = ask(client, sid)
        assert r.status_code == 200 and r.headers["x-vstream-replica"] == target
        cites_only(r.json(), STREAMS[sid])
        metrics = client.get("/metrics").text.splitlines()
        assert f"vstream:ingress_frames_held_total {len(during)}" in metrics
        assert "vstream:ingress_frames_dropped_total 2" in metrics
    assert snapshots.stream_ids(state_dir) == sorted(STREAMS)


def test_the_move_route_refuses_unknown_streams_and_replicas_and_bad_bodies(cluster):
    base, fleet, _, _ = cluster
    sid = next(iter(STREAMS))
    owner = directory(fleet)["streams"][sid]
    assert assert_error(move(base, "str_0123456789abcdef", owner), 404)["code"] == "unknown_stream"
    err = assert_error(move(base, sid, "replica-9"), 400)
    assert err["code"] == "unknown_replica" and err["message"].endswith("expected one of replica-1, replica-2")
    assert assert_error(move(base, sid, owner), 409)["code"] == "already_there"
    bad = httpx.post(f"{base}/v1/cluster/streams/{sid}/move", json=["replica-1"], timeout=DEADLINE_S)
    assert assert_error(bad, 400)["param"] == "replica"
    foreign = httpx.post(f"{base}/v1/cluster/streams/{sid}/move", json={"replica": other(owner)},
                         headers={"Origin": "http://evil.example"}, timeout=DEADLINE_S)
    assert assert_error(foreign, 403)["code"] == "origin_not_allowed"
    assert directory(fleet)["streams"][sid] == owner


def test_a_socket_that_created_its_stream_keeps_it_through_a_move_and_deletes_it_on_its_new_owner(cluster):
    base, fleet, _, _ = cluster
    with connect(base) as ws:
        sid = recv(ws, "session.created")["session"]["stream_id"]
        ws.send(frame(1.0, 70))
        assert recv(ws, "input_video_frame.ack")["accepted"]
        target = other(directory(fleet)["streams"][sid])
        assert move(base, sid, target).status_code == 200
        assert recv(ws, "stream.moved")["replica"] == target
        ws.send(frame(2.0, 80))
        assert recv(ws, "input_video_frame.ack")["accepted"]
        assert sid in own_ids(replica(fleet, target)["url"])
    wait_until(lambda: sid not in directory(fleet)["streams"], "the socket's stream forgotten when it closed")
    assert sid not in own_ids(replica(fleet, target)["url"]), "deleted on its new owner"


def test_a_busy_owner_answers_429_itself_and_its_stream_questions_never_go_to_another_replica(cluster):
    base, fleet, _, _ = cluster
    owners = directory(fleet)["streams"]
    sid = next(s for s in STREAMS if owners[s] == "replica-1")
    elsewhere = next(s for s in STREAMS if owners[s] == "replica-2")
    with httpx.Client(base_url=base, timeout=DEADLINE_S) as client, connect(base, sid) as ws:
        recv(ws, "session.created")
        ws.send(json.dumps(LONG))
        recv(ws, "response.created")  # replica-1's one answer slot (max_running=1) is taken for about a second
        for _ in range(3):
            r = ask(client, sid)
            err = assert_error(r, 429)
            assert err["code"] == "too_many_requests" and "max_running=1" in err["message"]
            assert r.headers["x-vstream-replica"] == "replica-1" and r.headers["retry-after"] == "1"
        r = ask(client, elsewhere)  # the other replica is free: the 429 was the owner's alone
        assert r.status_code == 200 and r.headers["x-vstream-replica"] == "replica-2"
        assert recv(ws, "response.done")["response"]["status"] == "completed"
        r = ask(client, sid)
        assert r.status_code == 200 and r.headers["x-vstream-replica"] == "replica-1"


def test_a_killed_replica_streams_come_back_on_the_other_with_their_memory(cluster):
    base, fleet, state_dir, media = cluster
    with httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        r = client.post("/v1/streams", json={"source": {"type": "file", "path": "clip.mp4"}, "speed": 2.0})
        assert r.status_code == 201, r.text
        replay = r.json()["id"]
        ingested(client, replay, 1)
        victim = directory(fleet)["streams"][replay]
        survivor = "replica-2" if victim == "replica-1" else "replica-1"
        on_victim = [s for s in STREAMS if directory(fleet)["streams"][s] == victim]
        assert on_victim, "the victim owns pushed streams too"
        time.sleep(2 * EVERY_S)  # every pushed frame is in a snapshot; the replay goes on
        with connect(base, on_victim[0]) as ws:
            recv(ws, "session.created")
            os.kill(replica(fleet, victim)["pid"], signal.SIGKILL)
            killed = time.monotonic()
            at_kill = shutil.copytree(state_dir, state_dir.parent / "at-kill")  # the dead replica writes no more
            closing = recv(ws, "session.closing")  # the socket to the dead owner is told, then closed
            assert closing["reason"] == "replica_failed"
        seen = set()
        while True:  # every stream stays listed, once, while it is restored
            listed = [s["id"] for s in client.get("/v1/streams").json()["data"]]
            assert sorted(listed) == sorted([*STREAMS, replay])
            r = ask(client, on_victim[0])
            seen.add(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.json()["error"]["code"] in ("stream_moving", "replica_unavailable")
            assert time.monotonic() - killed < FAILOVER_BOUND_S, f"not restored within {FAILOVER_BOUND_S} s"
            time.sleep(0.05)
        failover_s = time.monotonic() - killed
        print(f"failover: first answer from the new owner {failover_s:.2f} s after SIGKILL")
        assert r.headers["x-vstream-replica"] == survivor
        ident = snapshots.identity(vstream.load("tiny", device="cpu"))
        for sid in on_victim:
            r = ask(client, sid)
            assert r.status_code == 200 and r.headers["x-vstream-replica"] == survivor, r.text
            cites_only(r.json(), STREAMS[sid])
            memory = client.get(f"/v1/streams/{sid}/memory").json()
            assert (memory["frames_seen"], memory["stream_time"]) == (len(STREAMS[sid]), max(STREAMS[sid]))
            assert ray.get(fleet.save.remote(sid)), "the new owner saves the memory it restored"
            now, then = snapshots.read(state_dir, sid, ident).state, snapshots.read(at_kill, sid, ident).state
            assert snapshots.tensors_equal(now["memory"]["tensors"], then["memory"]["tensors"]), "bit for bit"
            assert (now["frames"], now["stream_time"]) == (then["frames"], then["stream_time"])
        wait_until(lambda: client.get(f"/v1/streams/{replay}").json().get("state") == "finished",
                   "the reopened replay finished on the survivor")
        memory = client.get(f"/v1/streams/{replay}/memory").json()
        assert (memory["frames_seen"], memory["stream_time"]) == (8, 7.0), "the replay went on after its snapshot"
        assert directory(fleet)["restores"][replay]["replica"] == survivor
        STREAMS[replay] = set()


def test_a_third_replica_joins_and_takes_new_streams(cluster):
    base, fleet, _, _ = cluster
    info = ray.get(fleet.add.remote())
    with httpx.Client(base_url=base, timeout=DEADLINE_S) as client:
        new = []
        for _ in range(2):
            r = client.post("/v1/streams", json={"source": {"type": "push"}})
            assert r.status_code == 201 and r.headers["x-vstream-replica"] == info["id"], r.text
            new.append(r.json()["id"])
        push(base, new[0], [5.0], 90)
        ingested(client, new[0], 1)
        r = ask(client, new[0])
        assert r.status_code == 200 and r.headers["x-vstream-replica"] == info["id"]
        cites_only(r.json(), {5.0})
        assert own_ids(info["url"]) == set(new)
        for sid in new:
            assert client.delete(f"/v1/streams/{sid}").status_code == 200
        assert not set(new) & set(directory(fleet)["streams"])
