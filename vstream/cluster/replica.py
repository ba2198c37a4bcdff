"""One engine replica of a cluster: a whole single-process server (`vstream.server.create_app`, the same routes) over
its own model and engine, on its own port, whose streams are the ones the directory gives it.

The fleet runs it as a Ray actor (`fleet.ReplicaActor`); its methods are what the fleet calls: where it listens, its
load, `adopt` a saved stream (moved here, or from a dead replica), `release` one (its sockets ended, then saved with
every frame it took and closed, to move it), `save` one now. Its state directory is the cluster's, shared: it
restores nothing at start (`restore=False`).

What it does not do: decide placement or talk to other replicas (the fleet does), or check Host and Origin for
clients (the ingress does; the replica answers only its own address as Host, and checks the key). It listens on
127.0.0.1 in a cluster on one machine, on its node's address otherwise (`host=None`): on a network, give it a key.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("vstream.cluster")


class ReplicaServer:
    """The app of one replica served by uvicorn on a thread of its own, ready when constructed."""

    def __init__(self, replica_id: str, model_name: str, state_dir: str, options: dict, host: str | None = "127.0.0.1",
                 threads: int | None = None):
        import torch
        import uvicorn

        import vstream
        from vstream.server import create_app
        from vstream.server.access import default_allowed_hosts

        if threads:
            torch.set_num_threads(threads)
        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        self.id = replica_id
        model = vstream.load(model_name, device=options.pop("device", "auto"), lora=options.pop("lora", None))
        self.app = create_app(model, state_dir=Path(state_dir), restore=False,
                              allowed_hosts=default_allowed_hosts(host), **options)
        self.state = self.app.state.vstream
        sock = _bound(host)
        port = sock.getsockname()[1]
        limits = self.state.limits
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5,
                                                    ws_max_size=limits.max_ws_message_bytes + 1024))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name=f"vstream-replica-{replica_id}")
        self.thread.start()
        self._wait_ready()
        self.url = f"http://{host}:{port}"

    def _wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not (self.server.started and self.state.ready):
            if not self.thread.is_alive():
                raise RuntimeError(f"replica {self.id}: its server exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {self.id}: not ready within {timeout_s} s")
            time.sleep(0.02)

    def info(self) -> dict:
        return {"id": self.id, "url": self.url, "pid": os.getpid()}

    def load(self) -> dict:
        """Its streams, its queue (answers running or waiting), for placement, and the p95 time to first token of its
        answers in the last minute (`ttft_p95_ms`, None without any), for the autoscaler."""
        p95 = self.state.recent_ttft.percentile(0.95)
        return {"streams": sorted(self.state.streams), "running": self.state.running,
                "ttft_p95_ms": None if p95 is None else round(p95 * 1000, 1)}

    def adopt(self, stream_id: str) -> dict:
        """Restore a saved stream here (from the shared state directory) -> its frames and stream time."""
        stream = self.state.durable.adopt(self.state, stream_id)
        lane = stream.session.lane
        return {"id": stream_id, "frames": lane.processor.frames, "stream_time": lane.processor.stream_time}

    def release(self, stream_id: str) -> None:
        """Hand the stream over. Each socket attached to it gets `session.closing {reason: "moved"}` and is closed
        once its client has ended it (`session.end`: the ingress does so at once, holding later frames for the new
        owner) or `ws_notice_s` later; a socket that created the stream no longer owns it (its closing deletes
        nothing). Then the stream is saved with every frame it took, unregistered and closed; its files stay for
        `adopt`. KeyError when it is not open here."""
        stream = self.state.streams.get(stream_id)
        if stream is None:
            raise KeyError(f"stream {stream_id} is not open on replica {self.id}")
        stream.owner = None
        grace = self.state.limits.ws_notice_s
        attached = [s for s in list(self.state.sockets) if s.stream is stream]
        for session in attached:
            session.end("moved", grace)
        for session in attached:
            if not session.closed.wait(grace + 5.0):
                log.warning("replica %s: a socket on stream %s was still open %s s after the move's notice",
                            self.id, stream_id, grace + 5.0)
        self.state.durable.release(self.state, stream_id)

    def save(self, stream_id: str) -> bool:
        """Write the stream's snapshot now (a new stream: so that it survives this replica from its first second)."""
        stream = self.state.streams.get(stream_id)
        return stream is not None and self.state.durable.save(self.state, stream, force=True)

    def stop(self) -> None:
        """End the server; its shutdown saves every stream it still holds (the durable drain)."""
        self.server.should_exit = True
        self.thread.join(30)


def _bound(host: str):
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.set_inheritable(True)
    return sock
