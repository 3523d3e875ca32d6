"""gooddrag.losses."""
