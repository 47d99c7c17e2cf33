"""`python -m cached_aside.demo`: start the demo server."""

from .server import main

main()
