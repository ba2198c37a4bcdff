"""The streaming engine: a session ingests one source into a bounded memory and answers questions concurrently."""

from vstream.engine.processor import Snapshot, StreamProcessor
from vstream.engine.session import FrameQueue, StreamSession

__all__ = ["FrameQueue", "Snapshot", "StreamProcessor", "StreamSession"]
