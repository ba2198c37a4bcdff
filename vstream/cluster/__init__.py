"""Streams spread over many engine replicas on Ray (`vstream serve --ray`): a directory of stream owners with hard
affinity (`directory`), the replicas, each a whole single-process server over its own engine (`replica`), the Ray
actor that runs them, moves streams and restores a dead replica's streams from their snapshots (`fleet`), and the
HTTP/WebSocket ingress that forwards each request to its stream's owner (`ingress`), each socket through a pipe that
holds its frames while its stream moves (`pipe`). `run.serve_cluster` starts it all.

Needs the `ray` extra; nothing outside this package imports it.
"""
