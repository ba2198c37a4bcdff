"""STAR memory: bounded Spatial, Temporal, Abstract and Retrieved memories over an unbounded stream of frames."""

from vstream.config import MemoryConfig
from vstream.errors import ConfigError
from vstream.memory.attention import AbstractAttention
from vstream.memory.kmeans import KMeansResult, weighted_kmeans
from vstream.memory.official import OfficialStreamingMemory, official_offline_memory
from vstream.memory.star import PARTS, MemoryRead, PaperStarMemory, StarMemoryBase, without


def build_memory(cfg: MemoryConfig, dim: int, attention: AbstractAttention, grid: int, device=None, dtype=None):
    """The streaming memory of `cfg.mode`: `PaperStarMemory` or `OfficialStreamingMemory`."""
    cls = {"paper": PaperStarMemory, "official": OfficialStreamingMemory}.get(cfg.mode)
    if cls is None:
        raise ConfigError(f"memory mode must be 'paper' or 'official', got {cfg.mode!r}")
    return cls(cfg, dim, attention, grid, device=device, dtype=dtype)


__all__ = [
    "PARTS", "AbstractAttention", "KMeansResult", "MemoryRead", "OfficialStreamingMemory", "PaperStarMemory",
    "StarMemoryBase", "build_memory", "official_offline_memory", "weighted_kmeans", "without",
]
