"""Streams spread over many engine replicas on Ray (`vstream serve --ray`): a directory of stream owners with hard
affinity (`directory`), the replicas, each a whole single-process server over its own engine (`replica`), the Ray
actor that runs them and restores a dead replica's streams from their snapshots (`fleet`), and the HTTP/WebSocket
ingress that forwards each request to its stream's owner (`ingress`). `run.serve_cluster` starts it all.

Needs the `ray` extra; nothing outside this package imports it.
"""
