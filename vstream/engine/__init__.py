"""The streaming engine: a session ingests one source into a bounded memory and answers questions concurrently."""

from vstream.engine.session import FrameQueue, Snapshot, StreamSession

__all__ = ["FrameQueue", "Snapshot", "StreamSession"]
