"""reid-app: ingest multi-camera video and search people across cameras with FA-Net."""

from reid_app.detect import configure_ultralytics_offline

__version__ = "0.1.0"

# Ultralytics reads its offline/auto-install switches once, at import: set them before anything
# in the application (or a test) can import it. Users with internet may export YOLO_OFFLINE=0.
configure_ultralytics_offline()
