"""HTTP server over `StreamSession`: `create_app` (`vstream.server.app`) builds the app, `serve`
(`vstream.server.run`) runs it. Importing this package loads no model."""

from vstream.server.app import create_app
from vstream.server.run import serve

__all__ = ["create_app", "serve"]
