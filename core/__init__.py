"""gooddrag.core."""
