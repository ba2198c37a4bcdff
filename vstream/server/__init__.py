"""HTTP server over `StreamSession`: see `vstream.server.app`. Importing this package loads no model."""

from vstream.server.app import create_app, serve

__all__ = ["create_app", "serve"]
