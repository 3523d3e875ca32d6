"""gooddrag.trackers."""
