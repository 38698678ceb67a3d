"""A real RTSP server for the live-stream tests: serves an H.264 MP4 file at
rtsp://127.0.0.1:PORT/cam with GStreamer's RTSP server (Debian: gir1.2-gst-rtsp-server-1.0,
gstreamer1.0-plugins-good/-bad, python3-gi). Each client session plays the file from its start.

    /usr/bin/python3 tests/rtsp_server.py VIDEO PORT

Run with the system Python (PyGObject comes from Debian); prints "ready" once it listens.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
video, port = sys.argv[1], sys.argv[2]
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f"( filesrc location={video} ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )")
factory.set_shared(False)
server.get_mount_points().add_factory("/cam", factory)
server.attach(None)
print("ready", flush=True)
GLib.MainLoop().run()
