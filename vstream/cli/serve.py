"""`vstream serve`: the HTTP API, the realtime WebSocket and the web page. The server is `vstream.server`; this module
checks the options (before the model loads) and shows the model's load stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vstream.cli.extras import needs_extra
from vstream.cli.options import DEFAULT_MODEL, DeviceOpt, LoraOpt, ModelOpt
from vstream.errors import UserInputError

# Durable streams, memory pages and the cluster (`--ray`): options as types, so that `serve` reads as their list.
StateDirOpt = Annotated[Optional[Path], typer.Option(help="Save every stream's memory, source and settings here and "
                                                     "restore them at start (made if missing; see README, Durable "
                                                     "streams).")]
SnapshotEveryOpt = Annotated[float, typer.Option(help="With --state-dir: seconds between snapshots (a kill -9 loses "
                                                 "at most this much).")]
MemoryPageOpt = Annotated[Optional[int], typer.Option(help="Streams whose memories update together in one batched "
                                                      "update (a memory page); 0: each memory alone. Default: the "
                                                      "engine's (see EngineConfig).")]
RayOpt = Annotated[bool, typer.Option("--ray", help="Spread streams over engine replicas on Ray behind one ingress "
                                      "(needs --state-dir, shared by the replicas; see README, Scale-out on Ray).")]
ReplicasOpt = Annotated[Optional[int], typer.Option(help="With --ray: engine replicas (default 2).")]
AutoscaleOpt = Annotated[Optional[str], typer.Option(metavar="MIN:MAX", help="With --ray: from MIN to MAX replicas, "
                                                     "added and drained on streams per replica.")]
StreamsPerReplicaOpt = Annotated[int, typer.Option(help="With --autoscale: the streams per replica at which one more "
                                                   "is added.")]
TtftTargetOpt = Annotated[Optional[float], typer.Option("--ttft-target-ms", help="With --autoscale: also add a "
                                                       "replica while the replicas' p95 time to first token over the "
                                                       "last minute is above this (mean over replicas); drain only "
                                                       "while every one is below half of it.")]
RayAddressOpt = Annotated[Optional[str], typer.Option(help="With --ray: an existing Ray cluster (default: start a "
                                                      "local one).")]
ReplicaThreadsOpt = Annotated[Optional[int], typer.Option(help="With --ray: torch CPU threads per replica (default: "
                                                          "torch's).")]
WebhookSecretOpt = Annotated[Optional[str], typer.Option(envvar="VSTREAM_WEBHOOK_SECRET", help="Sign watch webhooks "
                             "with this key (HMAC-SHA256, header X-Vstream-Signature); none: watches may not name a "
                             "webhook.")]


def serve(
    model: ModelOpt = DEFAULT_MODEL,
    lora: LoraOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    media_root: Annotated[
        Optional[Path], typer.Option(help="Directory that file sources must lie in (none: no files).")
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(envvar="VSTREAM_API_KEY", help="Require 'Authorization: Bearer KEY' (all routes but /health/*)."),
    ] = None,
    max_streams: Annotated[int, typer.Option(help="Most streams open at once.")] = 8,
    device: DeviceOpt = "auto",
    allow_private_sources: Annotated[
        bool, typer.Option(help="Let URL sources reach loopback, private, link-local and reserved addresses.")
    ] = False,
    drain_seconds: Annotated[
        float, typer.Option(help="On SIGTERM/Ctrl-C: not ready, sessions notified, closed after this long.")
    ] = 10.0,
    allowed_host: Annotated[
        Optional[list[str]],
        typer.Option(metavar="NAME", help="Also accept this Host name (repeatable; '*': any). Accepted anyway: "
                     "the names --host is bound as (all of the machine's for 0.0.0.0); with --api-key and no "
                     "--allowed-host, any."),
    ] = None,
    state_dir: StateDirOpt = None,
    snapshot_every: SnapshotEveryOpt = 10.0,
    memory_page: MemoryPageOpt = None,
    ray: RayOpt = False,
    replicas: ReplicasOpt = None,
    autoscale: AutoscaleOpt = None,
    streams_per_replica: StreamsPerReplicaOpt = 4,
    ttft_target_ms: TtftTargetOpt = None,
    ray_address: RayAddressOpt = None,
    replica_threads: ReplicaThreadsOpt = None,
    webhook_secret: WebhookSecretOpt = None,
) -> None:
    """Serve the HTTP API, the realtime WebSocket and the web page at / (see README, HTTP API)."""
    needs_extra("server", "serve")
    cluster = _cluster_options(ray, replicas, autoscale, streams_per_replica, ray_address, replica_threads,
                               state_dir, ttft_target_ms)
    from vstream.model.loading import show_progress
    from vstream.server import serve as run_server

    _check(media_root, max_streams, drain_seconds, snapshot_every, memory_page)
    if cluster is not None:
        from vstream.cluster.run import serve_cluster

        options = {"media_root": media_root, "max_streams": max_streams, "device": device,
                   "allow_private_sources": allow_private_sources, "memory_page": memory_page,
                   "webhook_secret": webhook_secret, "lora": lora}
        serve_cluster(model, state_dir=state_dir, host=host, port=port, snapshot_every=snapshot_every,
                      api_key=api_key, allowed_hosts=allowed_host or (), server_options=options, **cluster)
        return
    show_progress()  # the model's load stages on stderr, before uvicorn's own lines
    run_server(model, host=host, port=port, media_root=media_root, api_key=api_key,
               max_streams=max_streams, device=device, allow_private_sources=allow_private_sources,
               drain_s=drain_seconds, allowed_hosts=allowed_host or (), state_dir=state_dir,
               snapshot_every=snapshot_every, memory_page=memory_page, webhook_secret=webhook_secret, lora=lora)


def _check(media_root: Path | None, max_streams: int, drain_seconds: float, snapshot_every: float,
           memory_page: int | None) -> None:
    if media_root is not None and not media_root.is_dir():
        raise UserInputError(f"--media-root must be an existing directory, got {media_root}")
    if max_streams < 1:
        raise UserInputError(f"--max-streams must be >= 1, got {max_streams}")
    if drain_seconds < 0:
        raise UserInputError(f"--drain-seconds must be >= 0, got {drain_seconds}")
    if not snapshot_every > 0:
        raise UserInputError(f"--snapshot-every must be > 0 seconds, got {snapshot_every}")
    if memory_page is not None and memory_page < 0:
        raise UserInputError(f"--memory-page must be >= 0 (0: off), got {memory_page}")


def _cluster_options(ray: bool, replicas: int | None, autoscale: str | None, streams_per_replica: int,
                     ray_address: str | None, replica_threads: int | None, state_dir: Path | None,
                     ttft_target_ms: float | None = None) -> dict | None:
    """The cluster's settings for `serve_cluster` (None without --ray), each checked before anything starts."""
    given = {"--replicas": replicas, "--autoscale": autoscale, "--ray-address": ray_address,
             "--replica-threads": replica_threads, "--ttft-target-ms": ttft_target_ms}
    if not ray:
        named = [name for name, value in given.items() if value is not None]
        if named:
            raise UserInputError(f"{', '.join(named)} need --ray (a cluster of replicas), got them without it")
        return None
    needs_extra("ray", "serve --ray")
    if state_dir is None:
        raise UserInputError("--ray needs --state-dir DIR: the replicas' shared snapshot store, from which a dead "
                             "replica's streams are restored (a directory every replica's node sees)")
    if replicas is not None and autoscale is not None:
        raise UserInputError(f"--replicas and --autoscale exclude each other, got --replicas {replicas} and "
                             f"--autoscale {autoscale}")
    if replicas is not None and replicas < 1:
        raise UserInputError(f"--replicas must be >= 1, got {replicas}")
    if streams_per_replica < 1 or (replica_threads is not None and replica_threads < 1):
        raise UserInputError(f"--streams-per-replica and --replica-threads must be >= 1, got {streams_per_replica} "
                             f"and {replica_threads}")
    if ttft_target_ms is not None and (autoscale is None or not ttft_target_ms > 0):
        raise UserInputError(f"--ttft-target-ms needs --autoscale and a value > 0, got {ttft_target_ms} with "
                             f"--autoscale {autoscale}")
    return {"replicas": replicas or 2, "autoscale": None if autoscale is None else parse_range(autoscale),
            "target_streams": streams_per_replica, "address": ray_address, "threads": replica_threads,
            "ttft_target_ms": ttft_target_ms}


def parse_range(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (MIN, MAX) with 1 <= MIN <= MAX; UserInputError naming what came otherwise."""
    low, sep, high = text.partition(":")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()) or not 1 <= int(low) <= int(high):
        raise UserInputError(f"--autoscale must be MIN:MAX with 1 <= MIN <= MAX (replicas), got {text!r}")
    return int(low), int(high)
