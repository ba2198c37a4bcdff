"""The cluster's directory on its own (no Ray, no server): placement on the least-loaded replica, hard ownership,
failover plans that never lose or duplicate a stream, moves and drains."""

from __future__ import annotations

import pickle

import pytest

from vstream.cluster.directory import Directory, MoveRefused, NoReplica


def three() -> Directory:
    d = Directory()
    for i in (1, 2, 3):
        d.join(f"r{i}", f"http://127.0.0.1:{9000 + i}", 100 + i)
    return d


def create(d: Directory, stream_id: str) -> str:
    replica = d.place()
    d.placed(replica.id, stream_id)
    return replica.id


def test_new_streams_go_to_the_least_loaded_replica_counting_pending_and_queue():
    d = three()
    assert [create(d, f"s{i}") for i in range(6)] == ["r1", "r2", "r3", "r1", "r2", "r3"]
    pending = d.place()  # a creation in flight counts: the next one goes elsewhere
    assert pending.id == "r1" and d.place().id == "r2"
    d.unplace("r1")
    d.unplace("r2")
    d.report("r1", running=5)  # same stream count: the shorter queue wins
    assert d.place().id == "r2"


def test_ownership_is_one_replica_and_listing_has_each_stream_once():
    d = three()
    ids = {f"s{i}": create(d, f"s{i}") for i in range(5)}
    assert d.listing() == ids
    assert d.owner("s0").id == "r1" and d.owner("nope") is None
    d.forget("s0")
    assert "s0" not in d.listing() and "s0" not in d.replicas["r1"].streams


def test_a_dead_replica_streams_are_reassigned_to_live_ones_and_stay_listed_while_they_move():
    d = three()
    for i in range(6):
        create(d, f"s{i}")
    plan = d.fail("r1")
    assert set(plan) == {"s0", "s3"} and set(plan.values()) == {"r2", "r3"}, "spread over the live replicas"
    assert d.owner("s0") is None and set(d.listing()) == {f"s{i}" for i in range(6)}, "moving, still listed"
    with pytest.raises(KeyError):
        d.begin_move("s0", "r2")  # a moving stream has no owner to move it from
    for sid in plan:
        d.settle(sid, ok=True)
    assert {d.owner(s).id for s in plan} <= {"r2", "r3"} and not d.moving
    assert all(d.owner(f"s{i}") is not None for i in range(6))
    assert d.place().id != "r1", "a dead replica takes no streams"


def test_streams_wait_when_no_replica_is_left_then_go_to_the_next_one():
    d = Directory()
    d.join("r1", "u1", 1)
    create(d, "s0")
    assert d.fail("r1") == {} and d.listing() == {"s0": None}
    with pytest.raises(NoReplica):
        d.place()
    d.join("r2", "u2", 2)
    assert d.reassign_orphans() == {"s0": "r2"}
    d.settle("s0", ok=True)
    assert d.owner("s0").id == "r2"


def test_a_stream_placed_on_a_replica_that_died_meanwhile_is_not_owned_by_it():
    d = three()
    replica = d.place()
    d.fail(replica.id)
    d.placed(replica.id, "late")
    assert "late" not in d.listing() and d.replicas[replica.id].streams == set()


def test_a_restore_that_fails_loses_only_that_stream():
    d = three()
    create(d, "s0")
    create(d, "s1")
    d.fail("r1")
    d.settle("s0", ok=False)
    assert d.listing() == {"s1": "r2"}


def test_drain_plans_every_stream_elsewhere_and_stops_placement():
    d = three()
    for i in range(6):
        create(d, f"s{i}")
    plan = d.drain_plan("r1")
    assert set(plan) == {"s0", "s3"} and set(plan.values()) == {"r2", "r3"}
    assert all(r.pending == 0 for r in d.replicas.values())
    assert d.place().id in ("r2", "r3")
    source = d.begin_move("s0", plan["s0"])
    assert source == "r1" and d.listing()["s0"] is None
    d.settle("s0", ok=True)
    assert d.owner("s0").id == plan["s0"]


def refusal(d: Directory, stream_id: str, to: str) -> tuple[str, str]:
    with pytest.raises(MoveRefused) as refused:
        d.check_move(stream_id, to)
    return refused.value.reason, str(refused.value)


def test_a_move_is_refused_for_an_unknown_stream_or_replica_a_moving_stream_and_its_own_owner():
    d = three()
    create(d, "s0")
    d.drain_plan("r3")  # r3 takes no new streams: no move goes there
    d.check_move("s0", "r2")
    reason, message = refusal(d, "nope", "r2")
    assert reason == "unknown_stream" and "'nope'" in message
    reason, message = refusal(d, "s0", "r9")
    assert reason == "unknown_replica" and message.endswith("'r9' that takes streams: expected one of r1, r2")
    assert refusal(d, "s0", "r3")[0] == "unknown_replica"
    assert refusal(d, "s0", "r1") == ("already_there", "stream s0 is already on r1: expected another replica")
    d.begin_move("s0", "r2")
    assert refusal(d, "s0", "r1") == ("moving", "stream s0 is already moving to r2: wait for it to settle")
    assert pickle.loads(pickle.dumps(MoveRefused("moving", "m"))).reason == "moving", "Ray pickles it to the caller"


def test_saved_streams_nobody_owns_are_spread_at_start():
    d = three()
    create(d, "s0")
    plan = d.adopt_plan(["s0", "a", "b", "c"])
    assert plan == {"a": "r2", "b": "r3", "c": "r1"}, "s0 is owned: not adopted again"


def test_autoscaling_steps_on_streams_per_replica():
    d = Directory()
    assert d.scale_step(1, 3, target=2) == "up", "below the minimum"
    d.join("r1", "u1", 1)
    assert d.scale_step(1, 3, target=2) is None
    create(d, "s0")
    create(d, "s1")
    assert d.scale_step(1, 3, target=2) == "up", "2 streams on 1 replica: at the target"
    d.join("r2", "u2", 2)
    assert d.scale_step(1, 3, target=2) is None, "2 streams on 2 replicas"
    d.forget("s1")
    assert d.scale_step(1, 3, target=2) == "r2", "1 stream fits in 1 replica at half the target: drain the emptiest"
    assert d.scale_step(2, 3, target=2) is None, "never below the minimum"
    for i in range(2, 8):
        create(d, f"s{i}")
    d.join("r3", "u3", 3)
    assert d.scale_step(1, 3, target=2) is None, "never above the maximum"


def test_autoscaling_also_steps_on_the_time_to_first_token():
    d = Directory()
    d.join("r1", "u1", 1)
    create(d, "s0")
    assert d.scale_step(1, 3, target=4, ttft_ms=500) is None, "no answer yet: nothing to go on but streams"
    d.report("r1", running=2, ttft_p95_ms=900.0)
    assert d.scale_step(1, 3, target=4, ttft_ms=500) == "up", "1 stream, under the target, but answers start slowly"
    assert d.scale_step(1, 3, target=4) is None, "without a TTFT target only streams count"
    d.join("r2", "u2", 2)
    d.report("r2", running=0, ttft_p95_ms=100.0)
    assert d.scale_step(1, 3, target=4, ttft_ms=500) is None, "mean of 900 and 100 ms: 500, not above"
    d.report("r1", running=0, ttft_p95_ms=300.0)
    assert d.scale_step(1, 3, target=4, ttft_ms=500) is None, "300 ms is above half the target: no drain yet"
    d.report("r1", running=0, ttft_p95_ms=None)
    assert d.scale_step(1, 3, target=4, ttft_ms=500) == "r2", "calm, and 1 stream fits in one replica: drain"
    d.join("r3", "u3", 3)
    for r in ("r1", "r2", "r3"):
        d.report(r, running=5, ttft_p95_ms=2000.0)
    assert d.scale_step(1, 3, target=4, ttft_ms=500) is None, "never above the maximum"
