"""The demo server: `python examples/demo_server.py --port 8000` (or `make demo`).

Same as `python -m cached_aside.demo`; see --help for the options.
"""

from cached_aside.demo import main

if __name__ == "__main__":
    main()
