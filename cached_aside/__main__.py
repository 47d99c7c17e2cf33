"""`python -m cached_aside`: the operations command line."""

import sys

from .cli import main

sys.exit(main())
