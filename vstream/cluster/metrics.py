"""The cluster's one /metrics from its replicas' Prometheus text: each metric's HELP and TYPE once, every replica's
server-wide samples labelled with it, a stream's samples as they are (a stream has one owner).

This module only merges text; it fetches nothing (the ingress does).
"""

from __future__ import annotations


def merge_metrics(families: dict, text: str, replica_id: str) -> None:
    """Add one replica's Prometheus text to `families` (metric name -> (its HELP/TYPE lines, its samples)), each
    server-wide sample labelled with the replica (a stream's samples already name their one stream); a sample belongs
    to the family of the HELP/TYPE lines before it."""
    family = None
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            family = line.split()[2]
            families.setdefault(family, ({}, []))[0].setdefault(line, None)
        elif line and not line.startswith("#"):
            name = family or line.split("{")[0].split(" ")[0]
            per_stream = 'stream_id="' in line.rpartition(" ")[0]  # one owner: its series go on when it moves
            families.setdefault(name, ({}, []))[1].append(line if per_stream else labelled(line, replica_id))


def labelled(sample: str, replica_id: str) -> str:
    """A Prometheus sample line with `replica="<id>"` added to its labels."""
    name, _, value = sample.rpartition(" ")
    label = f'replica="{replica_id}"'
    if name.endswith("}"):
        return f"{name[:-1]},{label}}} {value}"
    return f"{name}{{{label}}} {value}"


def render(families: dict) -> str:
    """The merged families as Prometheus text: each one's HELP/TYPE lines, then its samples."""
    return "".join("".join(f"{c}\n" for c in comments) + "".join(f"{x}\n" for x in samples)
                   for comments, samples in families.values())
