"""`vstream serve --ray`: start (or join) a Ray cluster, the fleet with its replicas, and the ingress under uvicorn
in this process, until interrupted; then stop the replicas, each saving its streams. Nothing here routes a request."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterable
from pathlib import Path

import ray
import uvicorn

from vstream.cluster.fleet import FLEET_NAME, FleetActor
from vstream.cluster.ingress import create_ingress
from vstream.server import access
from vstream.server.state import Limits

log = logging.getLogger("vstream.cluster")


def start_fleet(model: str, state_dir: Path, replicas: int, options: dict, threads: int | None = 1,
                autoscale: tuple[int, int] | None = None, target_streams: int = 4,
                replica_host: str | None = "127.0.0.1", ttft_target_ms: float | None = None):
    """The fleet actor with `replicas` ready replicas over the shared `state_dir` (Ray must be initialised); the
    streams saved there come back, spread over the replicas. `autoscale` (MIN, MAX): replicas added and drained on
    streams per replica (`target_streams`) and, with `ttft_target_ms`, on the p95 time to first token, starting from
    MIN. `replica_host` None: replicas listen on their node's address (several machines), else on that address. The
    replicas share a `cookie_salt` drawn here (unless `options` gives one), so that each accepts the page cookies of
    the others; a new launch draws a new one, and the cookies of the last end with it."""
    options = {"cookie_salt": secrets.token_bytes(16)} | options  # one for every replica: its cookies work on all
    fleet = FleetActor.options(name=FLEET_NAME).remote(model, str(state_dir), options, threads,
                                                       autoscale=autoscale, target_streams=target_streams,
                                                       gpus=replica_gpus(options.get("device", "auto")),
                                                       replica_host=replica_host, ttft_target_ms=ttft_target_ms)
    ray.get(fleet.start.remote(autoscale[0] if autoscale else replicas))
    return fleet


def replica_gpus(device: str) -> int:
    """GPUs each replica asks for: one when the device is `auto` or `cuda` and the cluster has GPUs, else none."""
    wants = device == "auto" or device.startswith("cuda")
    return 1 if wants and ray.cluster_resources().get("GPU", 0) >= 1 else 0


def serve_cluster(model: str, *, replicas: int, state_dir: Path, host: str = "127.0.0.1", port: int = 8000,
                  address: str | None = None, snapshot_every: float = 10.0, api_key: str | None = None,
                  allowed_hosts: Iterable[str] = (), server_options: dict | None = None,
                  limits: Limits | None = None, autoscale: tuple[int, int] | None = None,
                  target_streams: int = 4, threads: int | None = None, ttft_target_ms: float | None = None) -> None:
    """Serve the API of `vstream serve` over `replicas` engine replicas on Ray (`address`: an existing cluster;
    None: a local one started here), or from MIN to MAX of them (`autoscale`, on `target_streams` per replica and,
    with `ttft_target_ms`, on the replicas' p95 time to first token over the last minute).
    `server_options` go to each replica's `create_app` (media root, max streams, device, ...); the state directory
    must be one that every replica's node sees. `threads`: torch threads per replica (None: torch's default)."""
    extra = list(allowed_hosts)
    hosts = None if api_key is not None and not extra else [*access.default_allowed_hosts(host), *extra]
    gate_hosts = access.allowed_hosts(hosts or ["*"])
    limits = limits or Limits()
    options = dict(server_options or {}) | {"api_key": api_key, "snapshot_every": snapshot_every, "limits": limits}
    ray.init(address=address, include_dashboard=False)
    fleet = start_fleet(model, Path(state_dir).resolve(), replicas, options, threads, autoscale, target_streams,
                        replica_host="127.0.0.1" if address is None else None, ttft_target_ms=ttft_target_ms)
    app = create_ingress(fleet, gate_hosts, limits)
    config = uvicorn.Config(app, host=host, port=port, ws_max_size=limits.max_ws_message_bytes + 1024,
                            timeout_graceful_shutdown=5)
    try:
        IngressServer(config, lambda: _stop(fleet)).run()
    finally:
        _stop(fleet)


class IngressServer(uvicorn.Server):
    """uvicorn's server that runs `on_exit` once it has stopped serving and before it re-raises the signal that
    stopped it (uvicorn re-raises SIGTERM and SIGINT, which would end the process before any `finally`)."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                self.on_exit()


def _stop(fleet) -> None:
    """Stop the replicas (each saves its streams at shutdown), then leave Ray; once."""
    if ray.is_initialized():
        ray.get(fleet.stop.remote())
        ray.shutdown()
