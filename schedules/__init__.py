"""gooddrag.schedules."""
