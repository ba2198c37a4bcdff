"""vstream: real-time question answering over unbounded video streams (Flash-VStream, STAR memory)."""

__version__ = "0.1.0"
