"""The streaming engine: one owner of the device serves every stream's frames, memory and answers; a session feeds
one source into it. The I/O-free core of one stream that each lane drives, `StreamProcessor`, is the model's
(`vstream.model.processor`) and is named here too."""

from vstream.engine.scheduler import Engine, EngineConfig, FrameQueue, engine_of
from vstream.engine.session import StreamSession
from vstream.model.processor import Snapshot, StreamProcessor

__all__ = ["Engine", "EngineConfig", "FrameQueue", "Snapshot", "StreamProcessor", "StreamSession", "engine_of"]
