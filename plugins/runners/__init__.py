"""Bench runners: how the samples of ``gooddrag bench`` are spread over workers (``local.py``)."""
