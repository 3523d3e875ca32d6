"""gooddrag.plugins."""
