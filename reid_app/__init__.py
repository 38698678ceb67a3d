"""reid-app: ingest multi-camera video and search people across cameras with FA-Net."""

__version__ = "0.1.0"
