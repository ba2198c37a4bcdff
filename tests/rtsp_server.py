"""A live RTSP server on 127.0.0.1 for tests: `/usr/bin/python3 tests/rtsp_server.py PORT [MOUNT]`.

Serves a live H.264 test pattern (320x240, 10 fps) at rtsp://127.0.0.1:PORT/MOUNT (default `/test`), shared between
clients, and prints `READY rtsp://127.0.0.1:PORT/MOUNT` on stdout once it listens. Runs until killed (SIGTERM/SIGINT).
Needs Debian's `python3-gi`, `gir1.2-gst-rtsp-server-1.0` and the GStreamer base/good/ugly plugins, so it must be run
by the system interpreter, not a venv one.
"""

import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = (
    "( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=10/1 "
    "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96 config-interval=1 )"
)


def main() -> None:
    port = int(sys.argv[1])
    mount = sys.argv[2] if len(sys.argv) > 2 else "/test"
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE)
    factory.set_shared(True)
    server.get_mount_points().add_factory(mount, factory)
    if server.attach(None) == 0:
        sys.exit(f"could not listen on 127.0.0.1:{port}")
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"READY rtsp://127.0.0.1:{port}{mount}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
