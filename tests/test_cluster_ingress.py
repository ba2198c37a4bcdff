"""The cluster ingress's merge of the replicas' Prometheus text, on its own (no Ray, no server): every server-wide
sample labelled with its replica (a stream's samples keep their labels: a stream has one owner), each metric one group with its HELP
and TYPE lines once."""

from __future__ import annotations

from vstream.cluster.ingress import labelled, merge_metrics

ONE = """# HELP vstream:streams Open streams.
# TYPE vstream:streams gauge
vstream:streams 2
# HELP vstream:frames_ingested_total Frames encoded into the memory.
# TYPE vstream:frames_ingested_total counter
vstream:frames_ingested_total{stream_id="str_a"} 6
"""


def test_samples_get_the_replica_label():
    assert labelled("vstream:streams 2", "replica-1") == 'vstream:streams{replica="replica-1"} 2'
    assert labelled('x_bucket{le="0.1"} 3', "r2") == 'x_bucket{le="0.1",replica="r2"} 3'


def test_each_metric_is_one_group_over_every_replica():
    families = {}
    merge_metrics(families, ONE, "replica-1")
    merge_metrics(families, ONE.replace("str_a", "str_b").replace("streams 2", "streams 1"), "replica-2")
    text = "".join("".join(f"{c}\n" for c in comments) + "".join(f"{x}\n" for x in samples)
                   for comments, samples in families.values())
    assert text.splitlines() == [
        "# HELP vstream:streams Open streams.", "# TYPE vstream:streams gauge",
        'vstream:streams{replica="replica-1"} 2', 'vstream:streams{replica="replica-2"} 1',
        "# HELP vstream:frames_ingested_total Frames encoded into the memory.",
        "# TYPE vstream:frames_ingested_total counter",
        'vstream:frames_ingested_total{stream_id="str_a"} 6',
        'vstream:frames_ingested_total{stream_id="str_b"} 6']
