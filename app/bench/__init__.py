"""``gooddrag bench`` and ``gooddrag score``: commands, running and resuming, result tables, report."""
