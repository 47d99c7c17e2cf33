"""`python -m cached_aside`: the operations command line."""

import sys

from ._cli import main

sys.exit(main())
