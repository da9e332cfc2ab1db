"""cgprocfs: container-aware /proc files served over FUSE."""

__version__ = "0.1.0"
