"""Bench runners: how the samples of ``gooddrag bench`` are spread over workers: ``local.py`` (this
process, the default) and ``ray.py`` (a Ray cluster, the optional extra ``gooddrag[ray]``)."""
