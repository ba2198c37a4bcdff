"""vstream: real-time question answering over unbounded video streams (Flash-VStream, STAR memory)."""

__version__ = "0.1.0"


def load(path_or_preset, **kwargs):
    """Load a model: a preset name, a released Flash-VStream directory or a vstream directory (see
    `vstream.model.loading.load` for the options)."""
    from vstream.model.loading import load as _load

    return _load(path_or_preset, **kwargs)


__all__ = ["__version__", "load"]
