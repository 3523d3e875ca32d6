"""The front-ends: the typer CLI (``cli.py``) and the benchmark (``bench/``); the top floor."""
