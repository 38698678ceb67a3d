"""reid-app: ingest multi-camera video and search people across cameras with FA-Net."""

import os

# OpenCV and its FFmpeg read their log levels once, when cv2 is first imported. Their warnings
# ("[tcp @ 0x...] Connection refused", "[ WARN:0@8.0] global cap.cpp ...") would stand before the
# one error line a failed stream gets; errors still show. Exported values win (for debugging).
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET: the app reports failures itself

from reid_app.detect import configure_ultralytics_offline  # noqa: E402 (after the log switches)

__version__ = "0.1.0"

# Ultralytics reads its offline/auto-install switches once, at import: set them before anything
# in the application (or a test) can import it. Users with internet may export YOLO_OFFLINE=0.
configure_ultralytics_offline()
