"""The demo server: a product page whose reads go through @cache_aside (as_hash=True)
over a real SQLite primary with a simulated read latency. Start it with
`python -m cached_aside.demo` or `make demo`."""

from .server import choose_engine, main

__all__ = ["choose_engine", "main"]
