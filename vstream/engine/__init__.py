"""The streaming engine: one owner of the device serves every stream's frames, memory and answers; a session feeds
one source into it; the processor is the I/O-free core of one stream."""

from vstream.engine.processor import Snapshot, StreamProcessor
from vstream.engine.scheduler import Engine, EngineConfig, FrameQueue, engine_of
from vstream.engine.session import StreamSession

__all__ = ["Engine", "EngineConfig", "FrameQueue", "Snapshot", "StreamProcessor", "StreamSession", "engine_of"]
